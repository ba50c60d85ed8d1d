"""Removing a plan's experts in place: counts and bytes, and merging with all weight on the survivor."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import logits, plan_for

from diep_lightning.pruning import PruningPlan
from diep_lightning.removal import apply_plan, size_report
from diep_lightning.testing import tiny_model

@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_counts_and_bytes(sparsity):
    model = tiny_model("mixtral")
    plan = plan_for(model, sparsity)
    total = sum(len(s) for s in plan.scores)
    assert plan.num_removed == round(sparsity * total)
    assert all(len(k) >= 2 for k in plan.kept)
    before = size_report(model)
    apply_plan(model, plan)
    after = size_report(model)
    assert after["expert_bytes"] == before["expert_bytes"] * (total - plan.num_removed) // total


def test_merging_with_all_weight_on_survivor_equals_pruning():
    model = tiny_model("qwen2_moe")
    plan = plan_for(model, 0.25)
    merged_plan = PruningPlan.from_dict(plan.to_dict())
    merged_plan.merges = [{k[0]: {"members": [k[0], *r], "weights": [1.0] + [0.0] * len(r)}} if r else {}
                          for k, r in zip(plan.kept, plan.removed)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(a, plan)
    apply_plan(b, merged_plan)
    assert torch.equal(logits(a), logits(b))
