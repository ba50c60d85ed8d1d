"""Adaptive expert skipping at inference (DiEP 4.3): drop a chosen expert whose routing weight is small
relative to the token's top expert, by a per-layer, per-pair threshold calibrated on data.

For a token whose top expert is e0, another chosen expert e is skipped when ``w_e < gamma(e0, e) * w_e0``
with ``gamma = gamma1 * gamma2``: gamma1 is the median of ``w_e / w_e0`` over calibration tokens (for top-k > 2
every non-top choice is compared with the top one), and ``gamma2(e0, e) = CKA(e0, e) / mean pairwise CKA``
(experts that compute alike are skipped more readily). Skipped slots are routed to a sentinel index that the
experts forward never computes, so the work really disappears.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diep_lightning.calibration import BlockObservation, cka_matrix, expert_outputs, observe_blocks
from diep_lightning.families import MoEBlock, MoEFamily, get_family


def gamma1(observation: BlockObservation) -> float:
    """Median over tokens (and non-top choices) of a chosen expert's weight relative to the top one."""
    weights = observation.weights.float()
    top = weights.max(dim=-1, keepdim=True).values.clamp_min(1e-20)
    ratios = weights / top
    mask = torch.ones_like(ratios, dtype=torch.bool)
    mask.scatter_(-1, weights.argmax(dim=-1, keepdim=True), False)
    return float(ratios[mask].median()) if mask.any() else 0.0


def calibrate_block(family: MoEFamily, block: MoEBlock, observation: BlockObservation) -> dict[str, Any]:
    """gamma1, the CKA matrix and the (N, N) thresholds of one block."""
    outputs = expert_outputs(family, block, observation)
    cka = cka_matrix(outputs)
    n = cka.shape[0]
    off_diagonal = cka[~torch.eye(n, dtype=torch.bool)]
    mean_cka = float(off_diagonal.mean()) if off_diagonal.numel() else 1.0
    g1 = gamma1(observation)
    gamma = g1 * cka / max(mean_cka, 1e-12)
    return {"gamma1": g1, "mean_cka": mean_cka, "gamma": gamma}


def install_skipping(model: nn.Module, gammas: dict[int, torch.Tensor], renormalize: bool = False) -> Any:
    """Install skipping with the given (N, N) thresholds per MoE block; returns the hook group (``.stats``
    counts skipped and total expert slots per block)."""
    family = get_family(model)
    return family.install_skipping(family.blocks(model), gammas, renormalize=renormalize)


@dataclass
class Skipping:
    """Calibrated skipping installed in a model.

    Attributes:
        gammas: per MoE block, the (N, N) thresholds.
        hooks: the installed hook group (``hooks.remove()`` uninstalls skipping).
        skipped_fraction: per MoE block, the share of chosen expert slots skipped on the calibration tokens.
        renormalize: whether surviving weights are rescaled when a slot is skipped.
    """

    gammas: dict[int, torch.Tensor]
    hooks: Any
    skipped_fraction: dict[int, float] = field(default_factory=dict)
    renormalize: bool = False

    def record(self) -> dict[str, Any]:
        """What an export's ``pruning.json`` keeps (``plan.extra``) so that loading re-installs it."""
        return {"skip_gammas": {str(i): g.tolist() for i, g in self.gammas.items()},
                "skip_renormalize": self.renormalize,
                "skip_fraction": {str(i): f for i, f in self.skipped_fraction.items()}}


@torch.no_grad()
def calibrate_skipping(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_tokens: int = 4096,
                       renormalize: bool = False) -> Skipping:
    """Calibrate gammas on ``batches``, install skipping in ``model``, and measure the skipped share on them."""
    batches = list(batches)
    family = get_family(model)
    observations = observe_blocks(model, family, batches, max_tokens)
    gammas = {b.index: calibrate_block(family, b, observations[b.index])["gamma"] for b in family.blocks(model)}
    hooks = install_skipping(model, gammas, renormalize=renormalize)
    model.diep_skipping = hooks
    hooks.stats.clear()
    observe_blocks(model, family, batches, None)
    skipped = {i: s[0] / max(1, s[1]) for i, s in hooks.stats.items()}
    hooks.stats.clear()
    return Skipping(gammas=gammas, hooks=hooks, skipped_fraction=skipped, renormalize=renormalize)


def install_skipping_from_record(model: nn.Module, record: dict[str, Any]) -> Any:
    """Re-install the skipping recorded in an export's ``pruning.json``."""
    extra = record.get("plan", {}).get("extra", {})
    gammas = {int(k): torch.tensor(v) for k, v in extra.get("skip_gammas", {}).items()}
    group = install_skipping(model, gammas, renormalize=bool(extra.get("skip_renormalize", False)))
    model.diep_skipping = group
    return group
