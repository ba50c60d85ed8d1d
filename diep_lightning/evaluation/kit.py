"""Offline evaluation kit: lm-eval tasks over local files.

The task YAMLs in ``tasks/`` are templates whose data paths start with ``@DATA_DIR@``; lm-eval needs
absolute ``data_files``, so :func:`render_tasks` writes a copy with the placeholder replaced by the
chosen data directory into a temporary directory, and a ``TaskManager`` indexes only that directory
(the default manager indexes ~14k hub tasks and takes ~10 s; it is built only when a non-kit task name
is requested). Tasks whose files are missing from the data directory are left out (groups keep the
members that remain).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


__all__ = [
    "DEFAULT_TASKS",
    "SHIPPED_DATA_DIR",
    "RenderedKit",
    "default_data_dir",
    "evaluate",
    "flatten_results",
    "get_task_manager",
    "list_kit_tasks",
    "render_tasks",
    "resolve_data_dir",
    "validate_tasks",
]

log = logging.getLogger(__name__)

from diep_lightning.evaluation.tasks_render import (  # noqa: E402  (the task files; re-exported: kit's public API)
    DEFAULT_TASKS, SHIPPED_DATA_DIR, RenderedKit, _check_tasks,
    _parse_tasks, _unknown_task_error, default_data_dir, get_task_manager, list_kit_tasks, render_tasks,
    resolve_data_dir)

def _clean_value(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        v = float(v)
        return v if math.isfinite(v) else None
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return _clean_value(v.item())
    except ImportError:  # pragma: no cover
        pass
    return None


def flatten_results(raw: dict, requested: Sequence[str] = ()) -> dict[str, Any]:
    """Turn ``lm_eval.simple_evaluate`` output into ``{task: {metric: value}}`` plus ``"name/metric"`` floats.

    Metric keys drop lm-eval's ``",none"`` filter suffix (other filters stay as ``"metric,filter"``);
    ``"N/A"`` stderrs are dropped; non-finite values become ``None``; ``n`` is the number of
    documents evaluated. For every name in ``requested`` (tasks and groups), the top-level key
    ``"<name>/<metric>"`` holds the same values (stderrs excluded), e.g. ``"kit_blimp/acc"``.
    """
    out: dict[str, Any] = {}
    n_samples = raw.get("n-samples", {}) or {}
    for section in ("results", "groups"):
        for task, metrics in (raw.get(section) or {}).items():
            entry = out.setdefault(task, {})
            for key, value in metrics.items():
                if key in ("alias", "name", "sample_len", "samples", " "):
                    continue
                name = key[: -len(",none")] if key.endswith(",none") else key
                clean = _clean_value(value)
                if clean is None and not (isinstance(value, float) and not math.isfinite(value)):
                    continue
                entry[name] = clean
            if task in n_samples and isinstance(n_samples[task], dict):
                entry["n"] = int(n_samples[task].get("effective", 0))
    for name in requested:
        for metric, value in out.get(name, {}).items():
            if "_stderr" in metric or metric == "n":
                continue
            out[f"{name}/{metric}"] = value
    return out


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
def _model_max_length(config: Any) -> int | None:
    for cfg in (getattr(config, "text_config", None), config):
        if cfg is None:
            continue
        for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def _get_rng_state() -> tuple:
    import random

    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    import random

    import numpy as np
    import torch

    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _load_tokenizer(tokenizer: Any, model_path: str | None) -> Any:
    if tokenizer is None:
        if model_path is None or not Path(model_path).exists():
            raise ValueError(
                "tokenizer: none given and the model has no local name_or_path to load one from; pass tokenizer=<object or path>"
            )
        tokenizer = model_path
    if isinstance(tokenizer, (str, os.PathLike)):
        from diep_lightning.loading import load_tokenizer

        return load_tokenizer(os.fspath(tokenizer), required=True)
    return tokenizer


def evaluate(
    model: Any,
    tokenizer: Any = None,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
    random_seed: int = 0,
    progress: bool = False,
    per_document: bool = False,
) -> dict[str, Any]:
    """Evaluate a causal LM on kit tasks (or lm-eval hub tasks) with lm-eval's ``simple_evaluate``.

    ``progress=False`` hides lm-eval's progress bars (one per task and BLiMP paradigm) and skips its
    environment report (a ``pip list`` per call), so a run's console keeps only what matters.

    Args:
        model: A ``transformers.PreTrainedModel`` or a model directory (loaded with
            ``AutoModelForCausalLM``). A model object is put in eval mode for the run and its training
            mode (and device, when ``device`` moves it) restored afterwards, as are the global
            python / numpy / torch RNG states (lm-eval reseeds them), so it is safe to call from a
            training callback.
        tokenizer: Tokenizer object or path; default: loaded from the model directory.
        tasks: Task/group names (sequence or comma-separated string), e.g. ``"kit_blimp,kit_mmlu"``.
            See :func:`list_kit_tasks`. Names without the ``kit_`` prefix are looked up among lm-eval's own
            tasks (these need the hub).
        data_dir: Evaluation data directory: ``None`` = ``../shared/data/eval`` beside the repo if present,
            else the shipped subset; ``"shipped"`` = the shipped subset; or a path.
        limit: At most this many documents per task (a float < 1: that fraction).
        batch_size: lm-eval batch size.
        device: Move the model to this device for the run (``None``: leave it where it is / CUDA if a
            path is loaded and CUDA is available).
        num_fewshot: Few-shot examples (``None``: each task's default, 0 for all kit tasks).
        max_length: Context length for lm-eval (default: the model config's ``max_position_embeddings``,
            so rolling-loglikelihood windows fit the model).
        bootstrap_iters: lm-eval bootstrap iterations for stderrs (0: no stderrs, fastest; lm-eval's own
            default is 100000 and uses a process pool).
        random_seed: Seed passed to lm-eval (python, numpy, torch, few-shot).
        per_document: also return each document's metrics under ``"per_document"``, for paired comparisons
            of two models on the same documents (see :func:`per_document_metrics`).

    Returns:
        JSON-serialisable ``{task_or_group: {metric: value, "n": docs}}`` plus, for every requested
        name, ``"<name>/<metric>": value`` (e.g. ``"kit_blimp/acc"``, ``"kit_wikitext2/word_perplexity"``).
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = _parse_tasks(tasks)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit must be a positive int (docs per task) or a fraction in (0, 1), got {limit!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be a whole number >= 0 (or None: each task's default), got {num_fewshot!r}")
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but torch sees no CUDA device")
    kit = render_tasks(data_dir)
    need_defaults = _check_tasks(names, kit)
    task_manager = get_task_manager(kit.data_dir, include_defaults=need_defaults)
    if need_defaults:
        known = set(task_manager.all_tasks)
        for n in names:
            if n not in known:
                raise _unknown_task_error(n, kit, extra=task_manager.all_tasks)

    model_path: str | None = None
    if isinstance(model, (str, os.PathLike)):
        from diep_lightning.loading import load_causal_lm

        model_path = os.fspath(model)
        if not Path(model_path).exists():
            raise FileNotFoundError(f"model={model_path!r}: no such model directory; pass a model object or a saved model directory")
        target = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # exports (pruning.json) load with their per-layer expert counts and recorded skipping
        model = load_causal_lm(model_path, dtype=torch.float32 if target == "cpu" else None, device=target)
        restore = None
    else:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        model_path = name if name and Path(str(name)).exists() else None
        restore = (model.training, next(model.parameters()).device)
        if device is not None:
            model.to(device)
    tok = _load_tokenizer(tokenizer, model_path)
    max_len = max_length or _model_max_length(model.config)

    rng_state = _get_rng_state()
    model.eval()
    try:
        with _quiet_lm_eval(not progress):
            lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_len)
            raw = simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=task_manager,
                limit=limit,
                num_fewshot=num_fewshot,
                bootstrap_iters=bootstrap_iters,
                log_samples=per_document,
                random_seed=random_seed,
                numpy_random_seed=random_seed,
                torch_random_seed=random_seed,
                fewshot_random_seed=random_seed,
            )
    finally:
        _set_rng_state(rng_state)  # lm-eval reseeds the global RNGs; leave the caller's streams as they were
        if restore is not None:
            training, dev = restore
            model.train(training)
            if device is not None:
                model.to(dev)
    if raw is None:  # non-zero rank in a distributed run
        return {}
    out = flatten_results(raw, names)
    if per_document:
        out["per_document"] = per_document_metrics(raw, names)
    return out


def per_document_metrics(raw: dict, requested: Sequence[str]) -> dict[str, dict[str, list]]:
    """``{name: {metric: [value per document]}}`` from lm-eval's logged samples; a group's documents are its
    subtasks' in order. A rolling-loglikelihood metric's value is ``[loglikelihood, words or bytes]``."""
    out: dict[str, dict[str, list]] = {}
    subtasks = raw.get("group_subtasks") or {}
    for name in requested:
        metrics: dict[str, list] = {}
        for task in subtasks.get(name) or [name]:
            for sample in sorted(raw.get("samples", {}).get(task, []), key=lambda s: s["doc_id"]):
                for metric in sample.get("metrics", []):
                    value = sample.get(metric)
                    metrics.setdefault(metric, []).append(list(value) if isinstance(value, tuple) else value)
        out[name] = metrics
    return out


@contextlib.contextmanager
def _quiet_lm_eval(enabled: bool) -> Any:
    """Within the block, lm-eval's progress bars are off and its environment report (``pip list``) is skipped."""
    if not enabled:
        yield
        return
    import lm_eval.api.model as model_module
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module
    import lm_eval.models.huggingface as hf_module
    from tqdm import tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        return tqdm(*args, **{**kwargs, "disable": True})

    patches = [(m, "tqdm", silent) for m in (task_module, hf_module, model_module) if hasattr(m, "tqdm")]
    if hasattr(evaluator_module, "add_env_info"):
        patches.append((evaluator_module, "add_env_info", lambda results: None))
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def validate_tasks(tasks: str | Iterable[str], data_dir: str | os.PathLike | None = None) -> list[str]:
    """Check task names before any model work: kit names against the rendered kit, other names against
    lm-eval's own index (about 10 s, only when a non-kit name is given).

    Raises:
        ValueError: one line naming ``tasks``, with a "did you mean" suggestion.
    """
    names = _parse_tasks(tasks)
    kit = render_tasks(data_dir)  # cached per data directory
    if _check_tasks(names, kit):
        from lm_eval.tasks import TaskManager

        known = set(TaskManager().all_tasks)
        for name in names:
            if name not in kit.names and name not in known:
                raise _unknown_task_error(name, kit, sorted(known))
    return names
