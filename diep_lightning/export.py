"""Apply a pruning plan to a model and write an export that is really smaller and loads anywhere.

An export directory holds safetensors weights, ``config.json``, the tokenizer, a model card, ``pruning.json``
(enough to rebuild the pruned model from the original), plots, and, when layers keep different expert
counts, ``modeling_diep.py`` with an ``auto_map`` so that stock
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads it. A uniform export is a plain
checkpoint of the original architecture with a smaller expert count: stock ``from_pretrained(path)`` loads it.
Exports are written to a temporary folder and renamed when complete; nothing is silently overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diep_lightning.export_dir import PRUNING_FILE, atomic_directory, protected_paths
from diep_lightning.families import MoEFamily, get_family
from diep_lightning.pruned_model import modeling_file_source, shrink_to_layout
from diep_lightning.pruning import PruningPlan
from diep_lightning.serving.plan import PER_LAYER_FIELD

FORMAT_VERSION = 1


def expert_bytes(model: nn.Module, family: MoEFamily | None = None) -> tuple[int, int]:
    """(parameter count, bytes) of the routed experts' tensors."""
    family = family or get_family(model)
    params = [p for block in family.blocks(model) for p in block.experts.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes) of the whole model (tied weights counted once)."""
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values()), sum(p.numel() * p.element_size() for p in seen.values())


def apply_plan(model: nn.Module, plan: PruningPlan, family: MoEFamily | None = None) -> None:
    """Merge (if the plan has merge groups) then physically remove the plan's experts, in place."""
    family = family or get_family(model)
    blocks = family.blocks(model)
    if len(blocks) != len(plan.removed):
        raise ValueError(f"plan: made for {len(plan.removed)} MoE layers, the model has {len(blocks)}")
    for block, removed, merges in zip(blocks, plan.removed, plan.merges or [{}] * len(blocks)):
        for survivor, group in merges.items():
            family.merge_experts(block, int(survivor), [int(m) for m in group["members"]], group["weights"])
        family.remove_experts(block, removed)


def layout(model: nn.Module, family: MoEFamily | None = None) -> list[dict[str, int] | None]:
    """Per decoder layer: None (dense) or the block's expert count and router grouping."""
    family = family or get_family(model)
    spec: list[dict[str, int] | None] = [None] * len(family.decoder_layers(model))
    for block in family.blocks(model):
        entry: dict[str, int] = {"num_experts": block.num_experts}
        if getattr(block.router, "num_group", None) is not None:
            entry["num_group"] = int(block.router.num_group)
            entry["topk_group"] = int(block.router.topk_group)
        spec[block.layer_idx] = entry
    return spec


def _is_uniform(spec: list[dict[str, int] | None]) -> bool:
    moe = [s for s in spec if s]
    return all(s == moe[0] for s in moe)


def _plot(plan: PruningPlan, spec_counts: list[int], directory: Path, method: str = "DiEP") -> dict[str, Any]:
    """Experts kept per layer (against the count before) and a heatmap of the scores; returns the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures = {}
    layers = range(len(spec_counts))
    before = [len(s) for s in plan.scores]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(spec_counts) + 3), 4))
    ax.bar(layers, before, color="lightgray", label="before")
    ax.bar(layers, spec_counts, color="tab:blue", label="kept")
    for x, n in zip(layers, spec_counts):
        ax.text(x, n, str(n), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("routed experts")
    ax.set_title(f"Experts kept per layer ({plan.mode}, {plan.num_removed} of {sum(before)} removed)")
    ax.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(directory / "experts_per_layer.png", dpi=150)
    figures["experts_per_layer"] = fig
    width = max(len(s) for s in plan.scores)
    grid = torch.full((len(plan.scores), width), float("nan"))
    for i, row in enumerate(plan.scores):
        grid[i, : len(row)] = torch.tensor(row)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.22 * width + 3), max(4, 0.3 * len(plan.scores) + 1.5)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    labelled = False
    for layer, removed in enumerate(plan.removed):
        if removed:
            ax.scatter(removed, [layer] * len(removed), marker="x", color="red", s=18,
                       label=None if labelled else "removed")
            labelled = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert (original id)")
    ax.set_ylabel("MoE layer")
    ax.set_title("Expert scores (higher = kept); x = removed")
    if labelled:
        ax.legend(loc="upper right", fontsize=8)
    label = "DiEP score (alpha x beta)" if method.lower() == "diep" else f"{method} score"
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(directory / "expert_scores.png", dpi=150)
    figures["expert_scores"] = fig
    for f in figures.values():
        plt.close(f)
    return figures


def _model_card(source: str, plan: PruningPlan, counts: list[int], before: dict[str, int], after: dict[str, int],
                uniform: bool, method: str) -> str:
    rows = "\n".join(f"| {i} | {len(s)} | {n} |" for i, (s, n) in enumerate(zip(plan.scores, counts)))
    load = ("AutoModelForCausalLM.from_pretrained(path)" if uniform
            else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    pct = lambda a, b: f"{100.0 * (1 - a / b):.1f}%" if b else "n/a"  # noqa: E731
    return f"""---
library_name: transformers
tags: [mixture-of-experts, pruning, diep]
---
# Pruned with diep_lightning

- Source model: `{source}`
- Method: {method}, mode `{plan.mode}`, expert sparsity {plan.sparsity:.3f}
- Experts removed: {plan.num_removed} of {sum(len(s) for s in plan.scores)}
- Merged: {"yes" if any(plan.merges) else "no"}; adaptive skipping calibrated: {"yes" if "skip_gammas" in plan.extra else "no"}

| | parameters | bytes |
|---|---|---|
| whole model before | {before['params']:,} | {before['bytes']:,} |
| whole model after | {after['params']:,} | {after['bytes']:,} ({pct(after['bytes'], before['bytes'])} smaller) |
| routed experts before | {before['expert_params']:,} | {before['expert_bytes']:,} |
| routed experts after | {after['expert_params']:,} | {after['expert_bytes']:,} ({pct(after['expert_bytes'], before['expert_bytes'])} smaller) |

| MoE layer | experts before | experts kept |
|---|---|---|
{rows}

Load: `{load}`, or `diep_lightning.load_pruned(path)`.
`pruning.json` lists, per layer, the original ids of the kept experts and the scores that chose them.
"""


def export_pruned(model: nn.Module, plan: PruningPlan, export_dir: str | os.PathLike, *, source: str,
                  original: dict[str, int], tokenizer: Any = None, overwrite: bool = False,
                  method: str = "DiEP", extra_files: dict[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Write an already-pruned model and its plan to ``export_dir`` (atomically).

    Args:
        model: the pruned model (``apply_plan`` already done).
        plan: the plan that was applied.
        export_dir: final directory.
        source: the source model's path or hub id (recorded, never written to).
        original: sizes before pruning, from :func:`size_report`.
        tokenizer: saved with the model when given.
        overwrite: replace an existing ``export_dir``.
        method: name recorded in the model card and ``pruning.json``.
        extra_files: more text files to write (name -> content).

    Returns:
        The export path and the figures (for loggers).
    """
    family = get_family(model)
    spec = layout(model, family)
    uniform = _is_uniform(spec)
    counts = [s["num_experts"] for s in spec if s]
    after = size_report(model, family)
    with atomic_directory(export_dir, overwrite, protected_paths(source)) as tmp:
        config = model.config
        saved_attrs = {k: getattr(config, k, None) for k in ("auto_map", "diep_layers", "architectures")}
        base_cls = type(model)
        try:
            config.diep_layers = spec
            if uniform:
                moe = next(s for s in spec if s)
                setattr(config, family.num_experts_config_attr, moe["num_experts"])
                if "num_group" in moe:
                    config.n_group, config.topk_group = moe["num_group"], moe["topk_group"]
            else:
                config.auto_map = {"AutoModelForCausalLM": f"modeling_diep.DiEPPruned{base_cls.__name__}"}
                (tmp / "modeling_diep.py").write_text(
                    modeling_file_source(base_cls, family.block_attr, family.router_attr))
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for key, value in saved_attrs.items():
                if value is None and hasattr(config, key) and key != "architectures":
                    delattr(config, key)
                elif value is not None:
                    setattr(config, key, value)
        if not uniform:
            cfg_path = tmp / "config.json"
            cfg_path.write_text(json.dumps(non_uniform_config(json.loads(cfg_path.read_text()), spec, family,
                                                              base_cls.__name__), indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {
            "format_version": FORMAT_VERSION,
            "source_model": source,
            "model_type": model.config.model_type,
            "method": method,
            "uniform": uniform,
            "layers": [
                {"moe_layer": i, "decoder_layer": layer_idx, "experts_before": len(scores), "kept": kept,
                 "removed": removed, "scores": scores, "merges": {str(k): v for k, v in merges.items()}}
                for i, (layer_idx, kept, removed, scores, merges) in enumerate(zip(
                    [j for j, s in enumerate(spec) if s], plan.kept, plan.removed, plan.scores,
                    plan.merges or [{}] * len(plan.kept)))
            ],
            "plan": plan.to_dict(),
            "sizes": {"before": original, "after": after},
        }
        (tmp / PRUNING_FILE).write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(_model_card(source, plan, counts, original, after, uniform, method))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content)
        figures = _plot(plan, counts, tmp, method)
    return Path(export_dir).expanduser().resolve(), figures


def non_uniform_config(cfg: dict[str, Any], spec: list[dict[str, int] | None], family: MoEFamily,
                       base_name: str) -> dict[str, Any]:
    """A non-uniform export's config.json that says what it is: the per-layer counts in
    ``num_experts_per_layer``, the scalar count set to the largest layer's (every expert id stays in range),
    and an ``architectures`` name (``DiEP<stock class>``) that stock loaders do not take for the stock model."""
    counts = [s["num_experts"] if s else 0 for s in spec]
    return {**cfg, PER_LAYER_FIELD: counts, family.num_experts_config_attr: max(counts),
            "architectures": [f"DiEP{base_name}"]}


def size_report(model: nn.Module, family: MoEFamily | None = None) -> dict[str, int]:
    """Parameter and byte counts of the whole model and of its routed experts."""
    params, nbytes = model_bytes(model)
    eparams, ebytes = expert_bytes(model, family)
    return {"params": params, "bytes": nbytes, "expert_params": eparams, "expert_bytes": ebytes}


def read_pruning_record(path: str | os.PathLike) -> dict[str, Any]:
    """The ``pruning.json`` of an export, validated and checked against its ``config.json``.

    Raises:
        FileNotFoundError / ValueError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    record_path = path / PRUNING_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"path: {path} has no {PRUNING_FILE}; it is not a diep_lightning export")
    record = _read_json(record_path)
    config = _read_json(path / "config.json")
    validate_record(record, record_path)
    kept = [len(layer["kept"]) for layer in record["layers"]]
    spec = [s["num_experts"] for s in (config.get("diep_layers") or []) if s]
    if spec and spec != kept:
        raise ValueError(f"path: {PRUNING_FILE} lists {kept} experts per layer but config.json has {spec}; the "
                         "export was modified or mixed with another one; re-export it")
    return record


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"path: {file} is missing; the export is incomplete; re-export it") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f"line {err.lineno} column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise ValueError(f"path: {file} is not valid JSON ({where}); restore it or re-export") from None
    if not isinstance(data, dict):
        raise ValueError(f"path: {file} holds a JSON {type(data).__name__}, not an object; restore it or re-export")
    return data


def validate_record(record: dict[str, Any], file: Path | str = PRUNING_FILE) -> None:
    """Check that every layer's kept/removed expert ids are distinct, in range and account for every expert, and
    that skipping thresholds fit the kept experts; one line naming the file and the layer otherwise."""
    layers = record.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"path: {file} has no 'layers' list; re-export")
    for i, layer in enumerate(layers):
        n = layer.get("experts_before") if isinstance(layer, dict) else None
        kept, removed = (layer.get("kept"), layer.get("removed")) if isinstance(layer, dict) else (None, None)
        if not (isinstance(n, int) and n > 0 and isinstance(kept, list) and isinstance(removed, list)):
            raise ValueError(f"path: {file} layer {i} needs 'experts_before', 'kept' and 'removed'; re-export")
        ids = [*kept, *removed]
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise ValueError(f"path: {file} layer {i} has expert ids that are not integers; re-export")
        bad = sorted({e for e in ids if not 0 <= e < n})
        if bad:
            raise ValueError(f"path: {file} layer {i} lists expert ids {bad} outside 0..{n - 1}; re-export")
        if len(set(ids)) != len(ids) or len(ids) != n or not kept:
            raise ValueError(f"path: {file} layer {i}: kept {kept} and removed {removed} must each list distinct "
                             f"ids that together cover the layer's {n} experts once, with at least one kept; re-export")
    extra = (record.get("plan") or {}).get("extra") or {}
    for key, gamma in (extra.get("skip_gammas") or {}).items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(layers):
            raise ValueError(f"path: {file} has skip_gammas for MoE layer {key!r}, the export has {len(layers)}")
        n = len(layers[index]["kept"])
        if not (isinstance(gamma, list) and len(gamma) == n and all(isinstance(r, list) and len(r) == n for r in gamma)):
            raise ValueError(f"path: {file} skip_gammas of MoE layer {index} must be a {n}x{n} matrix (one row and "
                             "column per kept expert); re-export")


def load_pruned(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, skipping: bool = True,
                device: str | torch.device | None = None) -> nn.Module:
    """Load a diep_lightning export as a transformers model (no remote code needed).

    Args:
        path: export directory.
        dtype: weights' dtype (default: as saved).
        skipping: re-install adaptive expert skipping when the export has calibrated gammas.
        device: where to put the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    record = read_pruning_record(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "auto_map"):  # load in-process, never through the export's remote code
        del config.auto_map
    spec = getattr(config, "diep_layers", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if spec and not _is_uniform(spec):
        model_cls = pruned_model_class(config)
    else:
        model_cls = AutoModelForCausalLM
    model, info = model_cls.from_pretrained(path, config=config, dtype=dtype or "auto", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"path: the weights in {path} do not match its recorded layout ({problems}); the export "
                         "is incomplete or was modified; re-export it")
    model.eval()
    if device is not None:
        model.to(device)
    gammas = record.get("plan", {}).get("extra", {}).get("skip_gammas")
    if skipping and gammas:
        from diep_lightning.skipping import install_skipping_from_record

        install_skipping_from_record(model, record)
    return model


def pruned_model_class(config: Any) -> type:
    """The stock ``*ForCausalLM`` class of ``config``, subclassed to shrink its layers to ``config.diep_layers``
    before weights load (the in-process twin of the export's ``modeling_diep.py``)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    base_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    family = get_family(config)

    class DiEPPruned(base_cls):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            shrink_to_layout(self, config.diep_layers, family.block_attr, family.router_attr)

    DiEPPruned.__name__ = DiEPPruned.__qualname__ = f"DiEPPruned{base_cls.__name__}"
    return DiEPPruned
