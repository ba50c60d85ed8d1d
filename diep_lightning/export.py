"""Write a pruned model as an export that is really smaller and loads anywhere.

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

from torch import nn

from diep_lightning.export_dir import PRUNING_FILE, atomic_directory, protected_paths
from diep_lightning.families import MoEFamily, get_family
from diep_lightning.pruned_model import modeling_file_source
from diep_lightning.pruning import PruningPlan
from diep_lightning.record import build_record
from diep_lightning.removal import is_uniform, layout, size_report
from diep_lightning.report import model_card, plot_plan
from diep_lightning.serving.plan import PER_LAYER_FIELD

def export_pruned(model: nn.Module, plan: PruningPlan, export_dir: str | os.PathLike, *, source: str,
                  original: dict[str, int], tokenizer: Any = None, overwrite: bool = False,
                  method: str = "DiEP", extra_files: dict[str, str] | None = None,
                  keep_on_conflict: bool = False) -> tuple[Path, dict[str, Any]]:
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
        keep_on_conflict: write even when ``export_dir`` exists and may not be replaced, and keep the export beside
            it as ``<export_dir>.conflict-*`` (a run that searched before exporting loses nothing).

    Returns:
        The export path and the figures (for loggers).
    """
    family = get_family(model)
    spec = layout(model, family)
    uniform = is_uniform(spec)
    counts = [s["num_experts"] for s in spec if s]
    after = size_report(model, family)
    with atomic_directory(export_dir, overwrite, protected_paths(source), keep_on_conflict) as tmp:
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
            drop_tokenizer_code_map(tmp)
        record = build_record(plan, spec, source=source, model_type=model.config.model_type, method=method,
                              uniform=uniform, before=original, after=after)
        (tmp / PRUNING_FILE).write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(model_card(source, plan, counts, original, after, uniform, method))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content)
        figures = plot_plan(plan, counts, tmp, method)
    return Path(export_dir).expanduser().resolve(), figures


def drop_tokenizer_code_map(folder: Path) -> None:
    """Remove ``auto_map`` from a saved tokenizer's config: the export carries no tokenizer code, so the map would
    point at code that is not there, or make a loader fetch and run someone else's."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.pop("auto_map", None) is not None:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def non_uniform_config(cfg: dict[str, Any], spec: list[dict[str, int] | None], family: MoEFamily,
                       base_name: str) -> dict[str, Any]:
    """A non-uniform export's config.json that says what it is: the per-layer counts in
    ``num_experts_per_layer``, the scalar count set to the largest layer's (every expert id stays in range),
    and an ``architectures`` name (``DiEP<stock class>``) that stock loaders do not take for the stock model."""
    counts = [s["num_experts"] if s else 0 for s in spec]
    return {**cfg, PER_LAYER_FIELD: counts, family.num_experts_config_attr: max(counts),
            "architectures": [f"DiEP{base_name}"]}
