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


# ------------------------------------------------------------------ alignment, usage weights, the guard
from diep_lightning.alignment import align_members, expert_units, permute_units  # noqa: E402
from diep_lightning.merging import MergeSettings, usage_counts  # noqa: E402
from diep_lightning.pipeline import prune  # noqa: E402
from diep_lightning.removal import apply_plan  # noqa: E402
from diep_lightning.testing import TINY_CONFIGS  # noqa: E402


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_a_permutation_of_hidden_units_leaves_each_family_s_expert_unchanged(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    block = family.blocks(model)[0]
    x = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = family.expert_outputs(block, x, [3])
    units = expert_units(block, 3).shape[0]
    perm = torch.randperm(units, generator=torch.Generator().manual_seed(1))
    permute_units(block, 3, perm)
    torch.testing.assert_close(family.expert_outputs(block, x, [3]), before, atol=1e-5, rtol=1e-4)
    # the control: the down projection alone, permuted, does change the expert
    layout = type(family).unit_layout
    down = {k: v for k, v in layout.items() if k.startswith("down")}
    try:
        type(family).unit_layout = down
        permute_units(block, 3, perm)
    finally:
        type(family).unit_layout = layout
    assert not torch.allclose(family.expert_outputs(block, x, [3]), before, atol=1e-3)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_two_experts_that_are_permutations_of_each_other_merge_back_exactly(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    block = family.blocks(model)[0]
    tensors = dict(block.experts.named_parameters(recurse=False))
    with torch.no_grad():
        for t in tensors.values():
            t[5].copy_(t[2])
    original = {k: t[2].clone() for k, t in tensors.items()}
    permute_units(block, 5, torch.randperm(expert_units(block, 5).shape[0], generator=torch.Generator().manual_seed(2)))
    assert not torch.equal(tensors["down_proj"][5], original["down_proj"])
    before, after = align_members(block, 2, [2, 5])[5]
    assert after == pytest.approx(1.0, abs=1e-5) and before < 0.9
    family.merge_experts(block, 2, [2, 5], [0.5, 0.5])
    for name, t in tensors.items():
        torch.testing.assert_close(t[2], original[name], atol=1e-6, rtol=0)


def test_usage_weights_are_the_members_routing_frequencies():
    model = tiny_model("mixtral")
    family = get_family(model)
    block = family.blocks(model)[0]
    observation = observe_blocks(model, family, BATCHES, None)[block.index]
    counts = usage_counts(observation, 8)
    assert counts.sum() == observation.index.numel()
    groups = merge_groups(family, block, observation, [0, 1, 2, 3], [4, 5, 6, 7], weights="usage")
    for survivor, group in groups.items():
        expected = counts[group["members"]] / counts[group["members"]].sum()
        assert group["weights"] == pytest.approx(expected.tolist(), abs=1e-6)


def _held_out_errors(pruned, full, batches, holdout):
    """Each pruned block's output error against the full model's block on the guard's held-out block inputs."""
    family = get_family(full)
    observed = observe_blocks(full, family, batches, None)
    errors = []
    for big, small in zip(family.blocks(full), family.blocks(pruned)):
        hidden = observed[big.index].hidden
        hidden = hidden[hidden.shape[0] - round(hidden.shape[0] * holdout):].unsqueeze(0)
        a, b = big.module(hidden), small.module(hidden)
        a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
        errors.append(float((a - b).pow(2).sum(-1).mean()))
    return errors


def test_the_guard_folds_only_groups_that_lower_the_held_out_error_and_apply_plan_follows_it():
    batches = [{"input_ids": torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(s))}
               for s in range(2)]
    scores = [torch.arange(8.0) for _ in range(2)]
    settings = {"weights": "similarity", "temperature": 5.0, "holdout": 0.5}  # hot: members take large shares
    out = prune(tiny_model("mixtral"), scores, 0.5, "uniform", batches=batches, merge=settings)
    groups = [g for layer in out.plan.merges for g in layer.values()]
    assert groups and all(isinstance(g["merged"], bool) for g in groups)
    for g in groups:
        assert g["merged"] == (g["error_merged"] < g["error_unmerged"])
    reference = prune(tiny_model("mixtral"), scores, 0.5, "uniform").model
    with torch.no_grad():  # the model the plan produced has the errors the guard measured on its copy
        guarded = _held_out_errors(out.model, tiny_model("mixtral"), batches, 0.5)
        plain_errors = _held_out_errors(reference, tiny_model("mixtral"), batches, 0.5)
    for layer, got, base in zip(out.plan.merging["guard_errors"], guarded, plain_errors):
        assert got == pytest.approx(layer["error_guarded"], rel=1e-4)
        assert base == pytest.approx(layer["error_pruned"], rel=1e-4)
        assert got <= base
    assert out.plan.merging["weights"] == "similarity" and out.plan.merging["align"] is True
    # apply_plan folds exactly the groups the guard kept: the same plan with every group rejected is plain pruning
    plain = tiny_model("mixtral")
    rejected = [{s: {**g, "merged": False} for s, g in layer.items()} for layer in out.plan.merges]
    plan = select_experts(scores, 0.5, [2, 2], "uniform")
    plan.merges = rejected
    apply_plan(plain, plan)
    tokens = batches[0]["input_ids"]
    torch.testing.assert_close(plain(input_ids=tokens).logits, reference(input_ids=tokens).logits)
    if any(g["merged"] for g in groups):  # a folded group changes the model
        assert not torch.allclose(out.model(input_ids=tokens).logits, reference(input_ids=tokens).logits)


def test_merge_settings_refuse_what_cannot_work_in_one_line():
    with pytest.raises(ValueError, match="^weights: must be one of"):
        MergeSettings(weights="median")
    with pytest.raises(ValueError, match="^holdout: must be a share in"):
        MergeSettings(holdout=1.0)
    with pytest.raises(ValueError, match="^shares: every share must be in"):
        MergeSettings(shares=(0.0,))
    model = tiny_model("mixtral")
    family = get_family(model)
    layout = type(family).unit_layout
    try:
        type(family).unit_layout = None
        with pytest.raises(ValueError, match="^align: MixtralFamily does not say where"):
            prune(model, [torch.arange(8.0)] * 2, 0.5, batches=BATCHES, merge=True)
        prune(model, [torch.arange(8.0)] * 2, 0.5, batches=BATCHES, merge={"align": False})
    finally:
        type(family).unit_layout = layout
    with pytest.raises(ValueError, match="^merge: unknown settings"):
        prune(tiny_model("mixtral"), [torch.arange(8.0)] * 2, 0.5, batches=BATCHES, merge={"alignment": True})


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_aligned_guarded_merging_runs_on_every_family(model_type):
    batches = [{"input_ids": torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(s))}
               for s in range(2)]
    model = tiny_model(model_type).eval()
    blocks = get_family(model).blocks(model)
    scores = [torch.arange(b.num_experts, dtype=torch.float32) * (1 + b.index) for b in blocks]
    out = prune(model, scores, 0.5, "uniform", batches=batches, merge=True)
    assert out.plan.merging["align"] and out.plan.merging["guard_errors"]
    for layer in out.plan.merging["guard_errors"]:
        assert layer["error_guarded"] <= layer["error_pruned"]
    assert all("weight_cosine" in g for layer in out.plan.merges for g in layer.values())
    assert torch.isfinite(out.model(input_ids=batches[0]["input_ids"]).logits).all()
