"""Baselines through the same module, CLI, pruning and export as DiEP."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fit_args

from diep_lightning.methods import FrequencyScorer, NaeeScorer, ReapScorer, make_scorer
from diep_lightning.families import get_family
from diep_lightning.main import main
from diep_lightning.testing import tiny_model

TOKENS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _observe(model, scorer):
    family = get_family(model)
    blocks = family.blocks(model)
    routed = {}

    def sink(block, h, i, w):
        scorer.observe(family, block, h, i, w)
        routed.setdefault(block.index, []).append(i)

    hooks = family.install_routing_capture(blocks, sink)
    with torch.no_grad():
        model(TOKENS)
    hooks.remove()
    return family, blocks, routed


def test_frequency_counts_routed_tokens():
    model = tiny_model("qwen2_moe")
    scorer = FrequencyScorer()
    family, blocks, routed = _observe(model, scorer)
    scores = scorer.scores(family, blocks)
    for block in blocks:
        expected = torch.bincount(torch.cat(routed[block.index]).flatten(), minlength=8).float()
        assert torch.equal(scores[block.index], expected)
        assert scores[block.index].sum() == TOKENS.numel() * block.top_k


def test_reap_is_weight_times_output_norm():
    model = tiny_model("mixtral")
    scorer = ReapScorer()
    family, blocks, _ = _observe(model, scorer)
    seen = {}
    hooks = family.install_routing_capture(blocks[:1], lambda b, h, i, w: seen.update(h=h, i=i, w=w))
    with torch.no_grad():
        model(TOKENS)
    hooks.remove()
    e = int(seen["i"][0, 0])
    token, slot = (seen["i"] == e).nonzero(as_tuple=True)
    with torch.no_grad():
        out = family.expert_outputs(blocks[0], seen["h"][token], [e])[0]
    expected = (out.norm(dim=-1) * seen["w"][token, slot]).mean()
    torch.testing.assert_close(scorer.scores(family, blocks)[0][e], expected, atol=1e-5, rtol=1e-5)


def test_naee_picks_the_best_subset_and_refuses_huge_searches():
    model = tiny_model("mixtral")
    scorer = NaeeScorer(keep=4)
    family, blocks, _ = _observe(model, scorer)
    scorer.check(blocks, 0.5, "uniform")
    scores = scorer.scores(family, blocks)
    block = blocks[0]
    hidden = torch.cat(scorer.hidden[0], 0).unsqueeze(0)

    def error(removed):
        with torch.no_grad():
            ref = block.module(hidden)
            with family.masked_routing(block, removed):
                return float((block.module(hidden) - ref).pow(2).sum())

    chosen = [e for e in range(8) if scores[0][e] == 0]
    assert len(chosen) == 4
    for other in ([0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6]):
        assert error(chosen) <= error(other) + 1e-6
    with pytest.raises(ValueError, match="max_subsets"):
        NaeeScorer(keep=4, max_subsets=10).check(blocks, 0.5, "uniform")
    with pytest.raises(ValueError, match="uniform"):
        NaeeScorer(keep=4).check(blocks, 0.5, "global")
    with pytest.raises(ValueError, match="naee_keep: 4 experts per layer, but sparsity 0.25 keeps 6"):
        NaeeScorer(keep=4).check(blocks, 0.25, "uniform")
    with pytest.raises(ValueError, match="naee_keep: NAEE needs the number of experts each layer keeps"):
        NaeeScorer()


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method: expected one of"):
        make_scorer("magic")


@pytest.mark.parametrize("method,mode", [("random", "uniform"), ("frequency", "global"), ("reap", "global"),
                                         ("naee", "uniform")])
def test_baselines_run_through_the_cli_and_export(method, mode, tiny_mixtral_dir, tmp_path):
    export = tmp_path / "export"
    keep = ["--model.naee_keep=6"] if method == "naee" else []
    main(fit_args(tiny_mixtral_dir, str(tmp_path), "--model=BaselineModule", f"--model.method={method}", *keep,
                  "--trainer.callbacks+=GlobalExpertPruning", "--trainer.callbacks.sparsity=0.25",
                  f"--trainer.callbacks.mode={mode}", f"--trainer.callbacks.export_dir={export}", epochs=3))
    record = json.loads((export / "pruning.json").read_text())
    assert record["method"] == method
    assert sum(len(layer["removed"]) for layer in record["layers"]) == 4
