"""``pruning.json``: the record of what an export removed, merged and calibrated, and the checks on reading it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diep_lightning.export_dir import PRUNING_FILE
from diep_lightning.pruning import PruningPlan, recorded_skipping
from diep_lightning.serving.plan import PER_LAYER_FIELD

#: 2: skipping is recorded under ``plan.skipping`` (1: ``plan.extra.skip_*``, still read)
FORMAT_VERSION = 2


def build_record(plan: PruningPlan, spec: list[dict[str, int] | None], *, source: str, model_type: str, method: str,
                 uniform: bool, before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """The ``pruning.json`` of an export: per MoE layer the kept and removed original ids and their scores, the
    whole plan, and the sizes before and after."""
    return {
        "format_version": FORMAT_VERSION,
        "source_model": source,
        "model_type": model_type,
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
        "sizes": {"before": before, "after": after},
    }


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
    per_layer = config.get(PER_LAYER_FIELD)
    if per_layer is not None and (not isinstance(per_layer, list) or [c for c in per_layer if c] != kept):
        shown = _short(per_layer) if isinstance(per_layer, list) else repr(per_layer)
        raise ValueError(f"{PER_LAYER_FIELD}: config.json of {path} has {shown} (what vLLM builds) but {PRUNING_FILE} "
                         f"keeps {_short(kept)} experts per MoE layer; the export was modified; re-export it")
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


def _short(ids: list, shown: int = 8) -> str:
    """A list as an error line shows it: the first few ids and how many there are (a damaged record can hold
    millions)."""
    return str(ids) if len(ids) <= shown else f"[{', '.join(map(str, ids[:shown]))}, ... ({len(ids):,} ids)]"


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
            raise ValueError(f"path: {file} layer {i} lists expert ids {_short(bad)} outside 0..{n - 1}; re-export")
        if len(set(ids)) != len(ids) or len(ids) != n or not kept:
            raise ValueError(f"path: {file} layer {i}: kept {_short(kept)} and removed {_short(removed)} must each "
                             f"list distinct ids that together cover the layer's {n} experts once, with at least one "
                             "kept; re-export")
    try:
        skipping = recorded_skipping(record.get("plan") or {})
    except ValueError as err:
        raise ValueError(f"path: {file} {err}; re-export") from None
    for index, gamma in (skipping.gammas if skipping else {}).items():
        if not 0 <= index < len(layers):
            raise ValueError(f"path: {file} has skip_gammas for MoE layer {index}, the export has {len(layers)}")
        n = len(layers[index]["kept"])
        if not (isinstance(gamma, list) and len(gamma) == n and all(isinstance(r, list) and len(r) == n for r in gamma)):
            raise ValueError(f"path: {file} skip_gammas of MoE layer {index} must be a {n}x{n} matrix (one row and "
                             "column per kept expert); re-export")
