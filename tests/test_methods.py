"""Baselines through the same module, CLI, pruning and export as DiEP."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fit_args

from diep_lightning.methods import FrequencyScorer, NaeeScorer, ReapScorer, make_scorer
from diep_lightning.methods.ablation import AblationScorer
from diep_lightning.methods.evo import EvoScorer
from diep_lightning.methods.greedy import GreedyScorer
from diep_lightning.pruning import select_experts
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
    small = NaeeScorer(keep=4, max_subsets=10)  # scoring without check() refuses too, before searching
    small.hidden = scorer.hidden
    with pytest.raises(ValueError, match="max_subsets=10"):
        small.scores(family, blocks)
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


def test_reap_softmax_weighting_uses_the_raw_router_probability():
    model = tiny_model("mixtral")
    routing, raw = ReapScorer(), ReapScorer(weighting="softmax")
    family, blocks, _ = _observe(model, routing)
    _observe(model, raw)
    seen = {}
    hooks = family.install_routing_capture(blocks[:1], lambda b, h, i, w: seen.update(h=h, i=i))
    with torch.no_grad():
        model(TOKENS)
    hooks.remove()
    e = int(seen["i"][0, 0])
    token, _ = (seen["i"] == e).nonzero(as_tuple=True)
    with torch.no_grad():
        out = family.expert_outputs(blocks[0], seen["h"][token], [e])[0]
        probs = torch.softmax(seen["h"][token] @ blocks[0].router.weight.T, dim=-1)[:, e]
    torch.testing.assert_close(raw.scores(family, blocks)[0][e], (out.norm(dim=-1) * probs).mean(), atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(raw.scores(family, blocks)[0], routing.scores(family, blocks)[0])
    with pytest.raises(ValueError, match="reap_weighting"):
        ReapScorer(weighting="raw")


def test_naee_uses_every_calibration_token_by_default():
    model = tiny_model("mixtral")
    scorer = NaeeScorer(keep=4)
    _observe(model, scorer)
    assert all(n == TOKENS.numel() for n in scorer.seen.values())
    capped = NaeeScorer(keep=4, max_tokens=10)
    _observe(model, capped)
    assert all(n == 10 for n in capped.seen.values())


def _evaluating(scorer, model_type="mixtral"):
    """A model-evaluating scorer fed like BaselineModule feeds it: setup, the batch, then the routing."""
    model = tiny_model(model_type)
    family = get_family(model)
    blocks = family.blocks(model)
    scorer.setup(model, family, blocks)
    scorer.observe_batch({"input_ids": TOKENS})
    hooks = family.install_routing_capture(blocks, lambda b, h, i, w: scorer.observe(family, b, h, i, w))
    with torch.no_grad():
        model(TOKENS)
    hooks.remove()
    return model, family, blocks


def _loss(model, family, removed):
    import contextlib

    with torch.no_grad(), contextlib.ExitStack() as stack:
        for block, ids in removed:
            stack.enter_context(family.masked_routing(block, ids))
        logits = model(TOKENS).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten()))


def test_ablation_scores_are_the_loss_rise_of_removing_each_expert_alone():
    scorer = AblationScorer()
    model, family, blocks = _evaluating(scorer)
    scores = scorer.scores(family, blocks)
    base = _loss(model, family, [])
    for block, e in ((blocks[0], 3), (blocks[1], 6)):
        assert abs(float(scores[block.index][e]) - (_loss(model, family, [(block, [e])]) - base)) < 1e-5
    with pytest.raises(ValueError, match="max_evaluations"):
        AblationScorer(max_evaluations=10).check(blocks, 0.25, "global")


def test_greedy_removes_the_cheapest_expert_first_and_its_order_is_the_selection():
    scorer = GreedyScorer(until=0.25)
    model, family, blocks = _evaluating(scorer)
    scores = scorer.scores(family, blocks)
    assert len(scorer.order) == 4
    first = min(((b.index, e) for b in blocks for e in range(b.num_experts)),
                key=lambda be: _loss(model, family, [(blocks[be[0]], [be[1]])]))
    assert scorer.order[0] == first
    plan = select_experts(scores, 0.25, [2, 2], "global")
    assert sorted((i, e) for i, r in enumerate(plan.removed) for e in r) == sorted(scorer.order)
    with pytest.raises(ValueError, match="raise greedy_until"):
        scorer.check(blocks, 0.5, "global")
    with pytest.raises(ValueError, match="max_evaluations"):
        GreedyScorer(until=0.25, max_evaluations=20).check(blocks, 0.25, "global")
    capped = GreedyScorer(until=0.25, max_evaluations=20)  # scoring without check() refuses too, before searching
    capped.evaluator = scorer.evaluator
    before = scorer.evaluator.evaluations
    with pytest.raises(ValueError, match="max_evaluations=20"):
        capped.scores(family, blocks)
    assert scorer.evaluator.evaluations == before


class _GrowingCost:
    """A calibration loss whose removal costs only grow as more experts go (each expert's own cost plus a
    penalty per pair removed from the same layer): there the lazy search must equal the exact one."""

    def __init__(self, seed):
        gen = torch.Generator().manual_seed(seed)
        self.own = torch.rand(2, 8, generator=gen)
        self.pair = torch.rand(2, generator=gen)
        self.evaluations = 0

    def loss(self, removed):
        self.evaluations += 1
        return sum(float(self.own[layer, ids].sum()) + float(self.pair[layer]) * len(ids) * (len(ids) - 1) / 2
                   for layer, ids in removed.items() if ids)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_greedy_equals_exact_greedy_where_costs_only_grow_with_fewer_evaluations(seed):
    model = tiny_model("mixtral")
    blocks = get_family(model).blocks(model)
    orders, evaluations = {}, {}
    for lazy in (False, True):
        scorer = GreedyScorer(until=0.75, lazy=lazy)
        scorer.evaluator = _GrowingCost(seed)
        scorer.scores(None, blocks)
        orders[lazy], evaluations[lazy] = scorer.order, scorer.evaluator.evaluations
    assert orders[True] == orders[False] and len(orders[True]) == 12
    assert all(sum(1 for layer, _ in orders[True] if layer == b.index) <= 8 - b.top_k for b in blocks)
    assert evaluations[True] < evaluations[False]


def test_lazy_greedy_on_a_model_takes_the_cheapest_first_and_is_bounded_by_max_evaluations():
    scorer = GreedyScorer(until=0.25, lazy=True)
    model, family, blocks = _evaluating(scorer)
    scorer.scores(family, blocks)
    first = min(((b.index, e) for b in blocks for e in range(b.num_experts)),
                key=lambda be: _loss(model, family, [(blocks[be[0]], [be[1]])]))
    assert scorer.order[0] == first and len(scorer.order) == 4
    GreedyScorer(until=0.25, lazy=True, max_evaluations=20).check(blocks, 0.25, "global")  # 17 for the first pass
    with pytest.raises(ValueError, match="max_evaluations"):
        GreedyScorer(until=0.25, lazy=True, max_evaluations=16).check(blocks, 0.25, "global")
    with pytest.raises(ValueError, match="greedy_lazy"):
        GreedyScorer(until=0.5, max_evaluations=20).check(blocks, 0.25, "global")


def test_evo_allocates_the_budget_within_bounds_and_never_worse_than_uniform():
    scorer = EvoScorer(sparsity=0.375, criterion="frequency", population=6, generations=4, seed=1)
    model, family, blocks = _evaluating(scorer, "qwen2_moe")
    scores = scorer.scores(family, blocks)
    assert sum(8 - k for k in scorer.keep) == 6 and all(2 <= k <= 8 for k in scorer.keep)
    plan = select_experts(scores, 0.375, [2, 2], "global")
    assert [len(k) for k in plan.kept] == scorer.keep  # the global selection takes exactly the allocation
    assert scorer.history == sorted(scorer.history)  # elitism: the best never gets worse
    within = scorer.criterion.scores(family, blocks)
    ranking = [sorted(range(8), key=lambda e, s=s: -float(s[e])) for s in within]
    assert scorer.history[-1] >= scorer.evaluator.agreement(scorer._removed([5, 5], ranking))  # uniform was a candidate
    with pytest.raises(ValueError, match="evo_sparsity"):
        scorer.check(blocks, 0.25, "global")
    with pytest.raises(ValueError, match="evo_sparsity"):
        EvoScorer()


def test_evo_recorded_criterion_ranks_by_the_recorded_scores(tmp_path):
    recorded = torch.randn(2, 8, generator=torch.Generator().manual_seed(3)).tolist()
    (tmp_path / "scores.json").write_text(json.dumps({"scores": recorded}))
    scorer = EvoScorer(sparsity=0.375, criterion="recorded", scores_from=str(tmp_path / "scores.json"),
                       population=4, generations=2)
    model, family, blocks = _evaluating(scorer, "qwen2_moe")
    scorer.check(blocks, 0.375, "global")
    plan = select_experts(scorer.scores(family, blocks), 0.375, [2, 2], "global")
    for layer, removed in enumerate(plan.removed):  # each layer loses its lowest recorded scores
        lowest = sorted(range(8), key=lambda e: recorded[layer][e])[: len(removed)]
        assert sorted(removed) == sorted(lowest)
    (tmp_path / "three.json").write_text(json.dumps({"scores": recorded + [recorded[0]]}))
    with pytest.raises(ValueError, match="evo_scores_from: the recorded scores"):
        EvoScorer(sparsity=0.375, criterion="recorded", scores_from=str(tmp_path / "three.json")).check(
            blocks, 0.375, "global")
    for bad in ("missing.json", "three.json"):
        with pytest.raises(ValueError, match="evo_scores_from"):
            EvoScorer(sparsity=0.375, criterion="reap", scores_from=str(tmp_path / bad))
    with pytest.raises(ValueError, match="evo_scores_from: cannot read"):
        EvoScorer(sparsity=0.375, criterion="recorded", scores_from=str(tmp_path / "missing.json"))


def test_evo_refines_a_diep_export_through_the_cli(tiny_mixtral_dir, tmp_path):
    main(fit_args(tiny_mixtral_dir, str(tmp_path / "diep"), "--trainer.callbacks+=GlobalExpertPruning",
                  "--trainer.callbacks.sparsity=0.25", f"--trainer.callbacks.export_dir={tmp_path / 'diep_export'}",
                  epochs=1))
    diep = json.loads((tmp_path / "diep_export" / "pruning.json").read_text())
    main(fit_args(tiny_mixtral_dir, str(tmp_path / "evo"), "--model=BaselineModule", "--model.method=evo",
                  "--model.evo_criterion=recorded", f"--model.evo_scores_from={tmp_path / 'diep_export'}",
                  "--model.evo_sparsity=0.25", "--model.evo_population=4", "--model.evo_generations=2",
                  "--trainer.callbacks+=GlobalExpertPruning", "--trainer.callbacks.sparsity=0.25",
                  f"--trainer.callbacks.export_dir={tmp_path / 'evo_export'}", epochs=1))
    evo = json.loads((tmp_path / "evo_export" / "pruning.json").read_text())
    assert evo["method"] == "evo" and sum(len(layer["removed"]) for layer in evo["layers"]) == sum(
        len(layer["removed"]) for layer in diep["layers"])
    for d, e in zip(diep["layers"], evo["layers"]):  # within a layer, DiEP's ranking decides who goes
        ranked = sorted(range(d["experts_before"]), key=lambda i: d["scores"][i])
        assert sorted(e["removed"]) == sorted(ranked[: len(e["removed"])])


def test_a_per_layer_score_ranked_globally_warns_unless_normalised(tiny_mixtral_dir, tmp_path):
    import warnings

    args = ["--model=BaselineModule", "--model.method=frequency", "--trainer.callbacks+=GlobalExpertPruning",
            "--trainer.callbacks.sparsity=0.25", "--trainer.callbacks.mode=global"]
    with pytest.warns(UserWarning, match="normalize=layer"):
        main(fit_args(tiny_mixtral_dir, str(tmp_path / "raw"), *args,
                      f"--trainer.callbacks.export_dir={tmp_path / 'raw_export'}", epochs=1))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*normalize=layer.*")
        main(fit_args(tiny_mixtral_dir, str(tmp_path / "norm"), *args, "--model.normalize=layer",
                      f"--trainer.callbacks.export_dir={tmp_path / 'norm_export'}", epochs=1))
    record = json.loads((tmp_path / "norm_export" / "pruning.json").read_text())
    for layer in record["layers"]:
        assert abs(sum(layer["scores"]) / len(layer["scores"]) - 1.0) < 1e-5  # each layer's mean is 1
