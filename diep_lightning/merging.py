"""Merging pruned experts into similar survivors (DiEP A.5), as plain functions over a model and calibration
batches: each pruned expert joins the survivor whose outputs are most alike (linear CKA on the same tokens), and
a group's merge weights are ``softmax(similarity / temperature)`` with the survivor's self-similarity 1."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from diep_lightning.calibration import BlockObservation, cka_matrix, expert_outputs, observe_blocks
from diep_lightning.families import MoEBlock, MoEFamily, get_family
from diep_lightning.pruning import PruningPlan

#: ``{survivor: {"members": [survivor, *merged], "weights": [...], "similarity": [...]}}`` of one block.
MergeGroups = dict[int, dict[str, list[float]]]


def merge_groups(family: MoEFamily, block: MoEBlock, observation: BlockObservation, kept: list[int],
                 removed: list[int], temperature: float = 1.0) -> MergeGroups:
    """Assign each removed expert of ``block`` to its most similar survivor and compute the merge weights."""
    cka = cka_matrix(expert_outputs(family, block, observation))
    similarity = {(r, k): float(cka[r, k]) for r in removed for k in kept}
    members: dict[int, list[int]] = {}
    for r in removed:
        best = max(kept, key=lambda k: similarity[(r, k)])
        members.setdefault(best, []).append(r)
    groups = {}
    for survivor, extra in members.items():
        sims = torch.tensor([1.0] + [similarity[(r, survivor)] for r in extra])
        weights = torch.softmax(sims / temperature, dim=0)
        groups[survivor] = {"members": [survivor, *extra], "weights": [float(w) for w in weights],
                            "similarity": [float(s) for s in sims]}
    return groups


GroupFn = Callable[[MoEFamily, MoEBlock, BlockObservation, list[int], list[int]], MergeGroups]


def plan_merges(model: nn.Module, plan: PruningPlan, batches: Iterable[dict[str, torch.Tensor]],
                temperature: float = 1.0, max_tokens: int = 4096, group_fn: GroupFn | None = None) -> list[MergeGroups]:
    """Fill ``plan.merges`` for the (still unpruned) ``model`` from calibration ``batches``; return them.

    ``group_fn`` replaces :func:`merge_groups` (a callback's override) with the same arguments, less temperature.
    """
    if plan.num_removed == 0:
        raise ValueError("ExpertMerging: nothing was pruned, so there is nothing to merge; raise sparsity or drop "
                         "the ExpertMerging callback")
    family = get_family(model)
    observations = observe_blocks(model, family, batches, max_tokens)
    group = group_fn or (lambda f, b, o, k, r: merge_groups(f, b, o, k, r, temperature))
    plan.merges = [group(family, b, observations[b.index], plan.kept[b.index], plan.removed[b.index])
                   if plan.removed[b.index] else {} for b in family.blocks(model)]
    return plan.merges


def merge_config(temperature: float, max_tokens: int) -> dict[str, Any]:
    """Checked merge settings (one line naming the argument otherwise)."""
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature!r}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens: must be > 0, got {max_tokens!r}")
    return {"temperature": float(temperature), "max_tokens": int(max_tokens)}
