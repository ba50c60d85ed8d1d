"""Family adapters: exact scaling, frozen weights, physical removal, merging, errors — for all nine families."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from diep_lightning.families import get_family, supported_model_types
from diep_lightning.testing import TINY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_CONFIGS)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_every_required_family_is_registered():
    assert set(FAMILIES) <= set(supported_model_types())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_scaling_by_ones_is_exact(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    blocks = family.blocks(model)
    tokens = _tokens()
    reference = _logits(model, tokens)
    ones = {b.index: torch.ones(b.num_experts) for b in blocks}
    hooks = family.install_scaling(blocks, ones.get)
    try:
        scaled = _logits(model, tokens)
        with hooks.disabled():
            teacher = _logits(model, tokens)
    finally:
        hooks.remove()
    assert torch.equal(scaled, reference)
    assert torch.equal(teacher, reference)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_scaling_one_expert_by_two_adds_exactly_its_share(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    block = family.blocks(model)[0]
    seen = {}
    capture = family.install_routing_capture([block], lambda b, h, i, w: seen.update(h=h, i=i, w=w))
    _logits(model, _tokens())
    capture.remove()
    hidden, index, weights = seen["h"], seen["i"], seen["w"]
    expert = int(index.flatten().mode().values)  # an expert that is surely chosen
    with torch.no_grad():
        base = block.experts(hidden, index, weights)
        scale = torch.ones(block.num_experts)
        scale[expert] = 2.0
        hooks = family.install_scaling([block], lambda i: scale)
        scaled = block.experts(hidden, index, weights)
        hooks.remove()
        own = family.expert_outputs(block, hidden, [expert])[0]
    share = ((index == expert) * weights).sum(-1, keepdim=True) * own
    assert share.abs().sum() > 0
    torch.testing.assert_close(scaled - base, share, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradients_reach_scales_and_weights_stay_frozen(model_type):
    model = tiny_model(model_type)
    model.requires_grad_(False)
    family = get_family(model)
    blocks = family.blocks(model)
    scales = {b.index: torch.nn.Parameter(torch.ones(b.num_experts)) for b in blocks}
    hooks = family.install_scaling(blocks, scales.get)
    out = model(_tokens(), labels=_tokens())
    out.loss.backward()
    hooks.remove()
    for b in blocks:
        assert scales[b.index].grad is not None and scales[b.index].grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def _removal_ids(block):
    """One expert from each router group (the tiny grouped routers have 2 groups of 4)."""
    return [1, 5]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_removal_equals_masked_routing(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    tokens = _tokens(1)
    block = family.blocks(model)[0]
    with family.masked_routing(block, _removal_ids(block)):
        masked = _logits(model, tokens)
    assert not torch.allclose(masked, _logits(model, tokens)), "masking must change the output"
    pruned = copy.deepcopy(model)
    pblock = family.blocks(pruned)[0]
    n_before = sum(p.numel() for p in pblock.experts.parameters())
    kept = family.remove_experts(pblock, _removal_ids(pblock))
    assert kept == [0, 2, 3, 4, 6, 7]
    assert pblock.num_experts == 6 and family.blocks(pruned)[1].num_experts == 8
    assert sum(p.numel() for p in pblock.experts.parameters()) == n_before * 6 // 8
    torch.testing.assert_close(_logits(pruned, tokens), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_blocks_of_different_sizes_run_forward_and_backward(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    blocks = family.blocks(model)
    family.remove_experts(blocks[0], [0, 4])
    family.remove_experts(blocks[1], [1, 2, 5, 6])
    assert [b.num_experts for b in family.blocks(model)] == [6, 4]
    out = model(_tokens(), labels=_tokens())
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_with_all_weight_on_survivor_equals_removal(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    merged, removed = copy.deepcopy(model), copy.deepcopy(model)
    mblock, rblock = family.blocks(merged)[0], family.blocks(removed)[0]
    family.merge_experts(mblock, survivor=0, members=[0, 1], weights=[1.0, 0.0])
    family.remove_experts(mblock, [1, 5])
    family.remove_experts(rblock, [1, 5])
    tokens = _tokens(2)
    assert torch.equal(_logits(merged, tokens), _logits(removed, tokens))
    # a real merge changes the survivor
    family.merge_experts(mblock, survivor=0, members=[0, 1], weights=[0.5, 0.5])
    assert not torch.equal(_logits(merged, tokens), _logits(removed, tokens))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_removal_never_goes_below_top_k(model_type):
    model = tiny_model(model_type)
    family = get_family(model)
    block = family.blocks(model)[0]
    with pytest.raises(ValueError, match="top-k"):
        family.remove_experts(block, list(range(7)))
    assert block.num_experts == 8


def test_grouped_router_uneven_removal_resets_grouping():
    model = tiny_model("deepseek_v3")
    family = get_family(model)
    block = family.blocks(model)[0]
    with pytest.warns(UserWarning, match="reset to one group"):
        family.remove_experts(block, [0, 1, 2])
    assert block.router.num_group == 1 and block.num_experts == 5
    assert torch.isfinite(_logits(model, _tokens())).all()


def test_grouped_router_even_removal_keeps_groups():
    model = tiny_model("deepseek_v3")
    family = get_family(model)
    block = family.blocks(model)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        family.remove_experts(block, [0, 7])
    assert block.router.num_group == 2


def test_unknown_model_type_lists_supported_families():
    config = tiny_model("mixtral").config
    config.model_type = "mixtrall"
    with pytest.raises(ValueError, match=r"unsupported MoE model_type 'mixtrall'.*did you mean 'mixtral'"):
        get_family(config)


def test_dense_model_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="dense model"):
        get_family(LlamaConfig())
