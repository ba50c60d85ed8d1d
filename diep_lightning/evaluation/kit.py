"""Offline evaluation kit: lm-eval tasks over local files.

The task YAMLs in ``tasks/`` are templates whose data paths start with ``@DATA_DIR@``; lm-eval needs
absolute ``data_files``, so :func:`render_tasks` writes a copy with the placeholder replaced by the
chosen data directory into a temporary directory, and a ``TaskManager`` indexes only that directory
(the default manager indexes ~14k hub tasks and takes ~10 s; it is built only when a non-kit task name
is requested). Tasks whose files are missing from the data directory are left out (groups keep the
members that remain).
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "tasks"
SHIPPED_DATA_DIR = HERE / "data"
PLACEHOLDER = "@DATA_DIR@"
#: Written into a folder that ``render_tasks`` rendered into: a later render may replace its files.
RENDER_MARKER = ".diep_kit_tasks"
DEFAULT_TASKS = ("kit_blimp", "kit_wikitext2")
_PATH_RE = re.compile(re.escape(PLACEHOLDER) + r"/([^\"'\n]+)")
_NAME_RE = re.compile(r"^(task|group):\s*(\S+)\s*$", re.M)


# --------------------------------------------------------------------------------------------------
# data directory and rendering
# --------------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """``../shared/data/eval`` next to the repository root if present, else the shipped subset."""
    repo_data = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "eval"
    return repo_data.resolve() if repo_data.is_dir() else SHIPPED_DATA_DIR


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Absolute data directory (``None``: :func:`default_data_dir`; ``"shipped"``: the shipped subset)."""
    if data_dir is None:
        return default_data_dir()
    if str(data_dir) == "shipped":
        return SHIPPED_DATA_DIR
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r} is not a directory; pass the eval data directory, 'shipped', or None"
        )
    return path


@dataclass
class RenderedKit:
    """Kit tasks rendered for one data directory."""

    data_dir: Path
    task_dir: Path
    tasks: list[str] = field(default_factory=list)  # leaf tasks whose files exist
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> members present
    missing: dict[str, list[str]] = field(default_factory=dict)  # leaf task -> missing files
    all_groups: dict[str, list[str]] = field(default_factory=dict)  # group -> all template members

    @property
    def names(self) -> list[str]:
        return sorted(set(self.tasks) | set(self.groups))

    def top_level(self) -> list[str]:
        """Groups not inside another group, and tasks in no group."""
        members = {m for ms in self.all_groups.values() for m in ms}
        return sorted(n for n in self.names if n not in members)

    def leaves(self, name: str) -> list[str]:
        """The leaf tasks under ``name`` (itself if it is a task), from the templates."""
        if name in self.all_groups:
            return [leaf for m in self.all_groups[name] for leaf in self.leaves(m)]
        return [name]


_RENDERED: dict[Path, RenderedKit] = {}
_MANAGERS: dict[tuple[Path, bool], Any] = {}


def _cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _yaml_dq_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def render_tasks(data_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> RenderedKit:
    """Write the kit task YAMLs with their data paths pointing into ``data_dir``.

    Args:
        data_dir: Evaluation data directory (see :func:`resolve_data_dir`).
        out_dir: Where to write the YAMLs; default a temporary directory removed at exit. Renders into
            a temporary directory are cached per data directory.

    Returns:
        A :class:`RenderedKit` (``task_dir`` is the ``include_path`` for lm-eval's ``TaskManager``).
    """
    ddir = resolve_data_dir(data_dir)
    if out_dir is None and ddir in _RENDERED and _RENDERED[ddir].task_dir.is_dir():
        return _RENDERED[ddir]
    if out_dir is None:
        task_dir = Path(tempfile.mkdtemp(prefix="diep_kit_tasks_"))
        atexit.register(_cleanup, task_dir)
    else:
        task_dir = Path(out_dir).expanduser().resolve()
        _check_render_dir(task_dir)
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / RENDER_MARKER).write_text("kit task YAMLs rendered by diep_lightning.evaluation\n", encoding="utf-8")
    kit = RenderedKit(data_dir=ddir, task_dir=task_dir)
    prefix = _yaml_dq_escape(ddir.as_posix())
    group_files: dict[str, tuple[Path, dict]] = {}
    for src in _templates():
        rel = src.relative_to(TEMPLATES_DIR)
        text = src.read_text(encoding="utf-8")
        names = dict((k, v) for k, v in _NAME_RE.findall(text))
        if "group" in names:
            cfg = yaml.safe_load(text)
            group_files[cfg["group"]] = (rel, cfg)
            kit.all_groups[cfg["group"]] = list(cfg.get("task") or [])
            continue
        if "task" in names:
            missing = [p for p in _PATH_RE.findall(text) if not (ddir / p).is_file()]
            if missing:
                kit.missing[names["task"]] = missing
                continue
            kit.tasks.append(names["task"])
        dst = task_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(text.replace(PLACEHOLDER, prefix), encoding="utf-8")
    # groups, innermost first: keep the members that are present
    present = set(kit.tasks)
    for _ in range(len(group_files) + 1):
        changed = False
        for g, (_rel, cfg) in group_files.items():
            members = [m for m in cfg.get("task") or [] if m in present]
            if members and g not in present:
                present.add(g)
                changed = True
        if not changed:
            break
    for g, (rel, cfg) in group_files.items():
        members = [m for m in cfg.get("task") or [] if m in present]
        if not members:
            continue
        kit.groups[g] = members
        cfg = dict(cfg, task=members)
        dst = task_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    if kit.missing:
        log.info("kit tasks left out (files missing in %s): %s", ddir, ", ".join(sorted(kit.missing)))
    if out_dir is None:
        _RENDERED[ddir] = kit
    return kit


def _templates() -> list[Path]:
    """The task and group YAML templates, in rendering order."""
    return [src for src in sorted(TEMPLATES_DIR.rglob("*")) if src.is_file() and "__pycache__" not in src.parts
            and (src.suffix == ".yaml" or src.name.endswith("_yaml"))]


def _check_render_dir(task_dir: Path) -> None:
    """Refuse a folder where rendering would replace a file that no earlier render wrote."""
    if task_dir.exists() and not task_dir.is_dir():
        raise NotADirectoryError(f"out_dir: {task_dir} is a file; name a new or empty folder")
    if not task_dir.is_dir() or (task_dir / RENDER_MARKER).is_file():
        return
    for src in _templates():
        clash = task_dir / src.relative_to(TEMPLATES_DIR)
        if clash.exists():
            raise FileExistsError(f"out_dir: {clash} exists and no earlier render wrote it; name a new or empty "
                                  "folder")


def list_kit_tasks(data_dir: str | os.PathLike | None = None, include_subtasks: bool = False) -> list[str]:
    """Kit task and group names available for ``data_dir``.

    Args:
        data_dir: Evaluation data directory (``None``: repo data if present, else the shipped subset).
        include_subtasks: Also list group members (``kit_blimp_<paradigm>``, ``kit_mmlu_<subject>``, ...).
    """
    kit = render_tasks(data_dir)
    return kit.names if include_subtasks else kit.top_level()


def get_task_manager(data_dir: str | os.PathLike | None = None, include_defaults: bool = False):
    """A cached lm-eval ``TaskManager`` indexing the kit tasks (plus lm-eval's own with ``include_defaults``)."""
    from lm_eval.tasks import TaskManager

    kit = render_tasks(data_dir)
    key = (kit.data_dir, include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=str(kit.task_dir), include_defaults=include_defaults)
    return _MANAGERS[key]


# --------------------------------------------------------------------------------------------------
# task-name checks
# --------------------------------------------------------------------------------------------------
def _parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",")]
    else:
        names = [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise ValueError("tasks: empty; give task names, e.g. tasks=('kit_blimp', 'kit_wikitext2')")
    return list(dict.fromkeys(names))


def _unknown_task_error(name: str, kit: RenderedKit, extra: Sequence[str] = ()) -> ValueError:
    guess = [f"kit_{name}"] if f"kit_{name}" in kit.names else []
    for pool in (kit.names + sorted(kit.missing), list(extra)):  # prefer kit names over hub names
        guess = guess or difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    hint = f" did you mean {guess[0]!r}?" if guess else ""
    return ValueError(
        f"tasks: unknown task {name!r};{hint} kit tasks: {', '.join(kit.top_level())} "
        "(group members: list_kit_tasks(include_subtasks=True))"
    )


def _check_tasks(names: list[str], kit: RenderedKit) -> bool:
    """Raise for unknown / unavailable kit names; return whether lm-eval's default tasks are needed."""
    need_defaults = False
    for n in names:
        if n in kit.names:
            continue
        leaves = kit.leaves(n)
        if n in kit.missing or (n in kit.all_groups and all(leaf in kit.missing for leaf in leaves)):
            files = sorted({f for leaf in leaves for f in kit.missing.get(leaf, [])})
            shown = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
            raise FileNotFoundError(
                f"tasks: {n!r} needs {shown} under data_dir={str(kit.data_dir)!r}; add the files or use data_dir=None / 'shipped'"
            )
        if n.startswith("kit_"):
            raise _unknown_task_error(n, kit)
        need_defaults = True
    return need_defaults


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
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
