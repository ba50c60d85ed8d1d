"""The CKA merge-group assignment (diep_lightning.merging), on a tiny model with a planted duplicate expert."""

from __future__ import annotations

import pytest
import torch

from diep_lightning.calibration import observe_blocks
from diep_lightning.families import get_family
from diep_lightning.merging import merge_groups, plan_merges
from diep_lightning.pruning import select_experts
from diep_lightning.testing import tiny_model

BATCHES = [{"input_ids": torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))}]


def _model_with_duplicate(duplicate: int, of: int, scale: float = 1.0):
    """A tiny Mixtral whose expert ``duplicate`` computes ``scale`` x expert ``of``'s output in every layer."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        for block in get_family(model).blocks(model):
            experts = block.experts
            experts.gate_up_proj[duplicate] = experts.gate_up_proj[of]
            experts.down_proj[duplicate] = scale * experts.down_proj[of]
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_a_removed_expert_joins_the_survivor_that_computes_alike(temperature):
    model = _model_with_duplicate(duplicate=5, of=2, scale=3.0)  # linear CKA ignores the scale
    family = get_family(model)
    block = family.blocks(model)[0]
    observation = observe_blocks(model, family, BATCHES, None)[block.index]
    kept, removed = [0, 1, 2, 3], [4, 5, 6, 7]
    groups = merge_groups(family, block, observation, kept, removed, temperature)
    owner = {r: s for s, g in groups.items() for r in g["members"][1:]}
    assert sorted(owner) == removed, "every removed expert is assigned exactly once"
    assert all(s in kept for s in owner.values())
    assert owner[5] == 2
    group = groups[2]
    similarity = dict(zip(group["members"], group["similarity"]))
    assert similarity[5] == pytest.approx(1.0, abs=1e-5)
    expected = torch.softmax(torch.tensor(group["similarity"]) / temperature, 0)
    assert group["weights"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert sum(group["weights"]) == pytest.approx(1.0)


def test_plan_merges_fills_every_pruned_layer_and_refuses_an_empty_plan():
    model = _model_with_duplicate(duplicate=5, of=2)
    blocks = get_family(model).blocks(model)
    plan = select_experts([torch.arange(8.0) for _ in blocks], 0.25, [b.top_k for b in blocks], "uniform")
    merges = plan_merges(model, plan, BATCHES)
    assert merges is plan.merges and len(merges) == len(blocks)
    for groups, removed in zip(merges, plan.removed):
        assert sorted(m for g in groups.values() for m in g["members"][1:]) == removed
    plan.removed = [[] for _ in blocks]
    with pytest.raises(ValueError, match="nothing was pruned"):
        plan_merges(model, plan, BATCHES)
