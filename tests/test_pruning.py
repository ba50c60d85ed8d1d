"""Choosing the experts to remove (global / uniform, never under top-k) and the plan's serialized form."""

from __future__ import annotations

import pytest
import torch

from diep_lightning.pruning import PruningPlan, SkipRecord, recorded_skipping, select_experts


def test_global_pruning_respects_top_k_when_scores_concentrate():
    scores = [torch.zeros(8), torch.ones(8)]  # layer 0 scores lowest everywhere
    plan = select_experts(scores, 0.5, [2, 2], "global")
    assert [len(k) for k in plan.kept] == [2, 6]
    with pytest.raises(ValueError, match="sparsity"):
        select_experts(scores, 0.9, [2, 2], "global")


def test_uniform_sparsity_below_top_k_is_refused():
    with pytest.raises(ValueError, match="uniform mode.*top-k"):
        select_experts([torch.rand(4)], 0.75, [2], "uniform")


def test_a_plan_with_skipping_survives_its_serialized_form():
    plan = select_experts([torch.arange(4.0), torch.arange(4.0).flip(0)], 0.25, [2, 2], "uniform")
    plan.skipping = SkipRecord(gammas={0: [[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]}, renormalize=True,
                               skipped_fraction={0: 0.25})
    back = PruningPlan.from_dict(plan.to_dict())
    assert back == plan
    assert PruningPlan.from_dict({**plan.to_dict(), "skipping": None}).skipping is None


def test_format_1_skipping_keys_are_still_read():
    """Exports written before the typed record kept skipping under ``plan.extra.skip_*``."""
    gammas = {"1": [[0.0, 0.3], [0.3, 0.0]]}
    old = {"extra": {"skip_gammas": gammas, "skip_renormalize": True, "skip_fraction": {"1": 0.1}}}
    assert recorded_skipping(old) == SkipRecord(gammas={1: gammas["1"]}, renormalize=True, skipped_fraction={1: 0.1})
    assert recorded_skipping({"extra": {}}) is None
    with pytest.raises(ValueError, match="MoE layer key 'x'"):
        recorded_skipping({"skipping": {"gammas": {"x": []}}})
