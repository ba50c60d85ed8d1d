"""Which experts to remove, from DiEP scores (eq. 10-11) or any baseline's scores.

Pure functions over per-layer score vectors, so the same selection serves DiEP, its uniform ablation and
every baseline: a method only has to produce one score per expert (higher = keep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def check_sparsity(sparsity: float) -> float:
    """Validate an expert sparsity (fraction of routed experts to remove)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity: the fraction of experts to remove must be in (0, 1), e.g. 0.5; got {sparsity!r}")
    return float(sparsity)


def check_budget(sparsity: float, sizes: Sequence[int], top_k: Sequence[int], mode: str,
                 all_layers: bool = True) -> int:
    """The number of experts ``sparsity`` removes from layers of ``sizes`` experts; refuse a sparsity that removes
    none or would leave a layer under its top-k. With ``all_layers=False`` the sizes describe one representative
    layer (from the config, before the model loads), so a global budget of 0 is not judged yet."""
    sparsity = check_sparsity(sparsity)
    if mode == "uniform":
        counts = [round(sparsity * n) for n in sizes]
        for layer, (count, n, k) in enumerate(zip(counts, sizes, top_k)):
            if n - count < k:
                raise ValueError(
                    f"sparsity: uniform mode removes {count} of {n} experts in layer {layer}, leaving fewer than its "
                    f"top-k={k}; use sparsity <= {(n - k) / n:.3f} or mode='global'"
                )
        budget = sum(counts)
    elif mode == "global":
        budget = round(sparsity * sum(sizes))
        max_removable = sum(n - k for n, k in zip(sizes, top_k))
        if budget > max_removable:
            raise ValueError(
                f"sparsity: {sparsity} removes {budget} of {sum(sizes)} experts but at most {max_removable} can go "
                f"without leaving a layer under its top-k; use sparsity <= {max_removable / sum(sizes):.3f}"
            )
    else:
        raise ValueError(f"mode: expected 'global' or 'uniform', got {mode!r}")
    if budget == 0 and (all_layers or mode == "uniform"):
        smallest = min(sizes) if mode == "uniform" else sum(sizes)
        raise ValueError(f"sparsity: {sparsity} removes no expert ({mode} rounding of {sparsity} x {smallest} is 0); "
                         f"use sparsity >= {0.5 / smallest:.3f}")
    return budget


@dataclass
class SkipRecord:
    """Calibrated adaptive skipping, as an export records it so that loading re-installs it.

    Attributes:
        gammas: per MoE block index, the (N, N) thresholds over its kept experts (``gammas[b][e0][e]``).
        renormalize: whether surviving weights are rescaled to their original sum when a slot is skipped.
        skipped_fraction: per MoE block index, the share of chosen expert slots skipped on calibration tokens.
        strength: the factor the calibrated thresholds were multiplied by (already in ``gammas``; kept to say so).
    """

    gammas: dict[int, list[list[float]]]
    renormalize: bool = False
    skipped_fraction: dict[int, float] = field(default_factory=dict)
    strength: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"gammas": {str(k): v for k, v in self.gammas.items()}, "renormalize": self.renormalize,
                "skipped_fraction": {str(k): v for k, v in self.skipped_fraction.items()}, "strength": self.strength}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipRecord:
        return cls(gammas={_block_key(k): v for k, v in (data.get("gammas") or {}).items()},
                   renormalize=bool(data.get("renormalize", False)),
                   skipped_fraction={_block_key(k): float(v) for k, v in (data.get("skipped_fraction") or {}).items()},
                   strength=float(data.get("strength", 1.0)))


def _block_key(key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ValueError(f"skipping: MoE layer key {key!r} is not an integer") from None


@dataclass
class PruningPlan:
    """Experts to remove per MoE block, with the scores that chose them.

    Attributes:
        removed: per block, the expert ids to remove (original numbering), sorted.
        kept: per block, the expert ids kept (original numbering), in the new order.
        scores: per block, the score of every expert (original numbering).
        sparsity: requested fraction of routed experts removed.
        mode: "global" or "uniform".
        merges: per block, ``{survivor: {"members": [...], "weights": [...]}}`` if pruned experts were merged.
        skipping: the calibrated skipping installed after removal, if any.
        router_calibration: what router calibration trained and measured (held-out KL before/after), if it ran.
        merging: the merge settings and, with the guard, each layer's held-out block error, if merging ran.
    """

    removed: list[list[int]]
    kept: list[list[int]]
    scores: list[list[float]]
    sparsity: float
    mode: str
    merges: list[dict[int, dict[str, list[float]]]] = field(default_factory=list)
    skipping: SkipRecord | None = None
    router_calibration: dict[str, Any] | None = None
    merging: dict[str, Any] | None = None

    @property
    def num_removed(self) -> int:
        return sum(len(r) for r in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "kept": self.kept, "scores": self.scores, "sparsity": self.sparsity,
                "mode": self.mode, "merges": [{str(k): v for k, v in m.items()} for m in self.merges],
                "skipping": self.skipping.to_dict() if self.skipping is not None else None,
                "router_calibration": self.router_calibration, "merging": self.merging}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        merges = [{int(k): v for k, v in m.items()} for m in data.get("merges", [])]
        return cls(removed=data["removed"], kept=data["kept"], scores=data["scores"], sparsity=data["sparsity"],
                   mode=data["mode"], merges=merges, skipping=recorded_skipping(data),
                   router_calibration=data.get("router_calibration"), merging=data.get("merging"))


def recorded_skipping(plan: dict[str, Any]) -> SkipRecord | None:
    """The skipping in a serialized plan (``pruning.json``'s ``plan``), None without it. Reads format 1's
    ``extra.skip_*`` keys too."""
    if plan.get("skipping"):
        return SkipRecord.from_dict(plan["skipping"])
    extra = plan.get("extra") or {}
    if extra.get("skip_gammas"):
        return SkipRecord.from_dict({"gammas": extra["skip_gammas"], "renormalize": extra.get("skip_renormalize"),
                                     "skipped_fraction": extra.get("skip_fraction")})
    return None


def select_experts(scores: Sequence[torch.Tensor], sparsity: float, top_k: Sequence[int],
                   mode: str = "global") -> PruningPlan:
    """Choose the experts to remove.

    Args:
        scores: per MoE block, a (N_l,) score per expert; lower scores are removed first.
        sparsity: fraction of all routed experts to remove.
        top_k: per block, the minimum number of experts it must keep (its top-k).
        mode: "global": rank all experts of all layers together and remove the bottom
            ``round(sparsity * sum N_l)`` (layers lose different numbers, eq. 11), skipping any expert whose
            removal would leave its layer under top-k; "uniform": remove ``round(sparsity * N_l)`` from
            each layer.

    Raises:
        ValueError: a bad sparsity or mode, or a uniform sparsity that leaves a layer under its top-k.
    """
    sparsity = check_sparsity(sparsity)
    sizes = [int(s.numel()) for s in scores]
    flat = [[float(v) for v in s.detach().float().cpu().tolist()] for s in scores]
    removed: list[list[int]] = [[] for _ in sizes]
    budget = check_budget(sparsity, sizes, top_k, mode)
    if mode == "global":
        order = sorted(((v, layer, e) for layer, row in enumerate(flat) for e, v in enumerate(row)))
        for _, layer, e in order:
            if budget == 0:
                break
            if sizes[layer] - len(removed[layer]) > top_k[layer]:
                removed[layer].append(e)
                budget -= 1
    elif mode == "uniform":
        for layer, (row, n) in enumerate(zip(flat, sizes)):
            count = round(sparsity * n)
            removed[layer] = sorted(range(n), key=lambda e: (row[e], e))[:count]
    removed = [sorted(r) for r in removed]
    kept = [[e for e in range(n) if e not in set(r)] for n, r in zip(sizes, removed)]
    return PruningPlan(removed=removed, kept=kept, scores=flat, sparsity=sparsity, mode=mode,
                       merges=[{} for _ in sizes])
