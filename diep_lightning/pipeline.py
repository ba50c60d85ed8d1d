"""Pruning without a Trainer: the one implementation of select -> merge -> remove -> calibrate the routers ->
skip that the callbacks, the benchmark and a notebook all call.

    scores = module.expert_scores()                       # DiEP's alpha * beta, or any method's scores
    pruned = diep_lightning.prune(model, scores, 0.5, "global", batches=calibration, calibrate_router=True)
    diep_lightning.export(pruned.model, pruned.plan, "out/", source="models/tiny-mixtral", original=pruned.before)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diep_lightning.removal import apply_plan, size_report
from diep_lightning.families import get_family
from diep_lightning.merging import GroupFn, MergeSettings, plan_merges
from diep_lightning.pruning import PruningPlan, select_experts
from diep_lightning.router_calibration import calibrate_routers, capture_teacher, settings_from
from diep_lightning.skipping import Skipping, calibrate_skipping


def select(model: nn.Module, scores: Sequence[torch.Tensor], sparsity: float, mode: str = "global") -> PruningPlan:
    """The experts to remove from ``model`` by ``scores`` (one tensor per MoE block, higher = keep), never
    leaving a block under its top-k."""
    blocks = get_family(model).blocks(model)
    return select_experts(scores, sparsity, [b.top_k for b in blocks], mode)


@dataclass
class Pruned:
    """The outcome of :func:`prune`: the model (pruned in place), its plan, sizes before and after, and the
    installed skipping (None without it)."""

    model: nn.Module
    plan: PruningPlan
    before: dict[str, int]
    after: dict[str, int]
    skipping: Skipping | None = None
    router_calibration: dict[str, Any] | None = None


def prune(model: nn.Module, scores: Sequence[torch.Tensor] | None, sparsity: float | None = None,
          mode: str = "global", *, plan: PruningPlan | None = None, batches: Sequence[dict[str, Any]] = (),
          merge_temperature: float | None = None, merge_max_tokens: int = 4096, merge_groups: GroupFn | None = None,
          merge: Any = None,
          skip: bool = False, skip_max_tokens: int = 4096, skip_renormalize: bool = False,
          skip_strength: float = 1.0, calibrate_router: Any = None, router_batches: Sequence[dict[str, Any]] = ()
          ) -> Pruned:
    """Prune ``model`` in place: select (or take ``plan``), merge pruned experts into survivors when ``merge`` is
    given (True, a dict of :class:`~diep_lightning.merging.MergeSettings` fields, or the settings; a bare
    ``merge_temperature`` merges by similarity without alignment or guard), remove them, train the surviving
    routers towards the original model's next-token distribution when ``calibrate_router`` is given (True, a dict
    of :class:`~diep_lightning.router_calibration.RouterCalibrationSettings` fields, or the settings), and
    calibrate skipping on the result when ``skip``.

    Merging, router calibration and skipping need calibration ``batches`` (dicts with ``input_ids``/
    ``attention_mask``); router calibration uses ``router_batches`` instead when given (it wants more text).
    ``RouterCalibration``'s default text is the model's own samples, drawn before this call changes it:
    ``router_batches=[{"input_ids": sample_sequences(model, 128, 256, start_token(model))}]``
    (:mod:`diep_lightning.router_calibration`)."""
    settings = settings_from(calibrate_router)
    if settings is not None:
        settings.check_family(get_family(model))
    merging = merge_settings(merge, merge_temperature, merge_max_tokens)
    if merging is not None:
        merging.check_family(get_family(model))
    if plan is None:
        plan = select(model, scores, sparsity, mode)
    if (merging is not None or skip) and not batches:
        raise ValueError("batches: merging and skipping calibrate on data; pass a few calibration batches")
    if settings is not None and not (router_batches or batches):
        raise ValueError("batches: router calibration distils on calibration text; pass calibration batches")
    if settings is not None and plan.num_removed == 0 and merging is None:
        raise ValueError("calibrate_router: nothing is pruned, so the routers have nothing to recover from; raise "
                         "sparsity or drop calibrate_router")
    if skip and not (isinstance(skip_strength, (int, float)) and skip_strength > 0):
        raise ValueError(f"skip_strength: must be a number > 0, got {skip_strength!r}")
    before = size_report(model)
    if merging is not None:
        plan_merges(model, plan, batches, group_fn=merge_groups, settings=merging)
    teacher = capture_teacher(model, router_batches or batches, settings) if settings is not None else None
    apply_plan(model, plan)
    if teacher is not None:
        plan.router_calibration = calibrate_routers(model, teacher, settings).to_dict()
    skipping = None
    if skip:
        skipping = calibrate_skipping(model, batches, skip_max_tokens, skip_renormalize, skip_strength)
        plan.skipping = skipping.record()
    return Pruned(model=model, plan=plan, before=before, after=size_report(model), skipping=skipping,
                  router_calibration=plan.router_calibration)


def merge_settings(merge: Any, temperature: float | None = None, max_tokens: int = 4096) -> MergeSettings | None:
    """``prune``'s merge argument as settings: None/False (no merging), True (defaults), a dict of fields or the
    settings; a bare ``temperature`` is the original similarity-weighted merge without alignment or guard."""
    if merge is None or merge is False:
        if temperature is None:
            return None
        return MergeSettings(weights="similarity", temperature=temperature, align=False, guard=False,
                             max_tokens=max_tokens, shares=())
    if merge is True:
        return MergeSettings(max_tokens=max_tokens)
    if isinstance(merge, MergeSettings):
        return merge
    if isinstance(merge, dict):
        unknown = sorted(set(merge) - set(MergeSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"merge: unknown settings {unknown}; known: {sorted(MergeSettings.__dataclass_fields__)}")
        return MergeSettings(**merge)
    raise ValueError(f"merge: True, a dict of MergeSettings fields or MergeSettings, got {type(merge).__name__}")
