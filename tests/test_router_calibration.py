"""Router calibration: the top-k KL, every family's trainable groups, the pipeline step and its bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import non_uniform_scores

from diep_lightning.families import get_family
from diep_lightning.pipeline import prune
from diep_lightning.router_calibration import (RouterCalibrationSettings, capture_teacher, settings_from, topk_kl,
                                               trainable_parameters)
from diep_lightning.testing import TINY_CONFIGS, tiny_model

FAST = {"steps": 12, "batch_size": 2, "eval_every": 3, "patience": 4, "holdout": 0.25, "lr": 2e-2}


def batches(n: int = 4, seed: int = 0, length: int = 24) -> list[dict[str, torch.Tensor]]:
    """``n`` copies of one batch of two random sequences: the held-out sequence is also trained on, so that on a
    random model (where nothing generalises) the held-out score still shows whether training works."""
    gen = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(3, 128, (2, length), generator=gen),
             "attention_mask": torch.ones(2, length, dtype=torch.long)}
    return [batch] * n


def test_topk_kl_is_the_exact_kl_with_the_whole_vocabulary_and_a_lower_bound_with_fewer_ids():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 50, generator=gen) * 3, torch.randn(2, 5, 50, generator=gen) * 3
    mask = torch.ones(2, 5)
    exact = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                       log_target=True, reduction="none").sum(-1).mean()
    lse = torch.logsumexp(teacher, -1)
    full = teacher.topk(50, dim=-1)
    assert torch.allclose(topk_kl(student, full.values, full.indices, lse, mask), exact, atol=1e-5)
    for k in (1, 5, 20):
        top = teacher.topk(k, dim=-1)
        coarse = topk_kl(student, top.values, top.indices, lse, mask)
        assert 0 <= coarse <= exact + 1e-5
    same = topk_kl(teacher, teacher.topk(5, -1).values, teacher.topk(5, -1).indices, lse, mask)
    assert abs(float(same)) < 1e-5
    # masked tokens do not count
    half = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    one = topk_kl(student[:1, :2], full.values[:1, :2], full.indices[:1, :2], lse[:1, :2], torch.ones(1, 2))
    assert torch.allclose(topk_kl(student, full.values, full.indices, lse, half), one, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_each_family_calibrates_its_routers_only_and_gets_closer_to_the_original(model_type):
    model = tiny_model(model_type)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # whatever the flags were, calibration gives them back
    data = batches()
    teacher_logits = model(input_ids=data[-1]["input_ids"]).logits.detach()
    out = prune(model, non_uniform_scores(model), 0.25, "global", batches=data,
                calibrate_router={**FAST, "groups": list(get_family(model).calibration_groups)})
    record = out.router_calibration
    assert record["heldout_kl_after"] <= record["heldout_kl_before"]
    assert record["train_kl_after"] < record["train_kl_before"], record
    assert record["parameters"] > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    # what trained is the family's groups; the experts and everything else kept their values and shapes
    reference = tiny_model(model_type)
    prune(reference, non_uniform_scores(reference), 0.25, "global")
    trained = set(record["parameter_names"])
    changed = {n for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters())
               if p.shape != q.shape or not torch.equal(p, q)}
    assert changed and changed <= trained, changed - trained
    assert any(".experts." not in n for n in changed) and not any(".experts." in n for n in trained)
    with torch.no_grad():
        kl = lambda m: torch.nn.functional.kl_div(  # noqa: E731
            torch.log_softmax(m(input_ids=data[-1]["input_ids"]).logits, -1), torch.log_softmax(teacher_logits, -1),
            log_target=True, reduction="batchmean")
        assert kl(model) <= kl(reference) + 1e-6


def test_groups_are_the_family_adapters_decision():
    mixtral, qwen = tiny_model("mixtral"), tiny_model("qwen2_moe")
    assert set(trainable_parameters(mixtral, ["router"])) == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert {n.rsplit(".", 2)[-2] for n in trainable_parameters(qwen, ["shared_gate"])} == {"shared_expert_gate"}
    assert all("post_attention_layernorm" in n for n in trainable_parameters(mixtral, ["norm"]))
    gpt = trainable_parameters(tiny_model("gpt_oss"), ["router"])
    assert any(n.endswith("router.bias") for n in gpt)
    v3 = trainable_parameters(tiny_model("deepseek_v3"), ["router"])
    assert not any("e_score_correction_bias" in n for n in v3)  # a selection bias: no gradient reaches it


def test_a_bf16_model_calibrates_through_float32_masters():
    model = tiny_model("mixtral").to(torch.bfloat16)
    out = prune(model, non_uniform_scores(model), 0.5, "global", batches=batches(), calibrate_router=FAST)
    assert out.router_calibration["train_kl_after"] < out.router_calibration["train_kl_before"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_calibration_runs_before_skipping_and_is_recorded_in_the_plan():
    model = tiny_model("qwen3_moe")
    out = prune(model, non_uniform_scores(model), 0.5, "global", batches=batches(), calibrate_router=FAST, skip=True)
    assert out.plan.skipping is not None and out.plan.to_dict()["router_calibration"]["steps_run"] >= 1
    from diep_lightning.pruning import PruningPlan

    again = PruningPlan.from_dict(out.plan.to_dict())
    assert again.router_calibration == out.plan.router_calibration


def test_the_teacher_keeps_top_k_logits_and_says_what_it_leaves_out():
    model = tiny_model("mixtral")
    teacher = capture_teacher(model, batches(2), RouterCalibrationSettings(top_k_logits=16).check())
    assert teacher.values.shape == (4, 24, 16) and teacher.nbytes_per_token() == 16 * 8 + 4
    assert 0 < teacher.tail_mass() < 1
    whole = capture_teacher(model, batches(2), RouterCalibrationSettings(top_k_logits=128).check())
    assert whole.tail_mass() < 1e-5


@pytest.mark.parametrize("value,starts", [
    ({"steps": 0}, "steps: must be an integer >= 1"),
    ({"lr": -1.0}, "lr: must be a finite number > 0"),
    ({"groups": ["experts"]}, "groups: unknown parameter group 'experts'"),
    ({"holdout": 1.0}, "holdout:"),
    ({"stepz": 3}, "calibrate_router: unknown setting 'stepz'"),
    ("yes", "calibrate_router: expected True"),
])
def test_bad_settings_are_one_line_naming_the_argument(value, starts):
    with pytest.raises(ValueError) as err:
        settings_from(value)
    assert str(err.value).startswith(starts) and "\n" not in str(err.value)


def test_bad_pipeline_input_is_refused_before_model_work():
    model = tiny_model("mixtral")
    before = [p.detach().clone() for p in model.parameters()]
    scores = non_uniform_scores(model)
    with pytest.raises(ValueError, match="^groups: MixtralFamily has no 'shared_gate'"):
        prune(model, scores, 0.5, batches=batches(), calibrate_router={"groups": ["shared_gate"]})
    with pytest.raises(ValueError, match="^batches: router calibration distils"):
        prune(model, scores, 0.5, calibrate_router=True)
    from diep_lightning.pruning import PruningPlan

    nothing = PruningPlan(removed=[[], []], kept=[list(range(8))] * 2, scores=[[0.0] * 8] * 2, sparsity=0.0,
                          mode="global")
    with pytest.raises(ValueError, match="^calibrate_router: nothing is pruned"):
        prune(model, None, plan=nothing, batches=batches(), calibrate_router=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pruning_steps_run_in_the_pipelines_order_whatever_the_list_order():
    from types import SimpleNamespace

    from diep_lightning.callbacks import (ExpertMerging, LmEvalValidation, RouterCalibration, SkipCalibration)
    from diep_lightning.callbacks.step import pruning_steps

    listed = [LmEvalValidation(tasks=["kit_copa"]), SkipCalibration(), RouterCalibration(), ExpertMerging()]
    ordered = pruning_steps(SimpleNamespace(callbacks=listed))
    assert [type(c).__name__ for c in ordered] == ["ExpertMerging", "RouterCalibration", "SkipCalibration",
                                                   "LmEvalValidation"]


def test_the_callback_calibrates_on_its_own_sources_with_the_datamodules_tokenizer(tmp_path):
    """``sources`` replaces the default text: sequences from a file are cut by the datamodule's tokenizer and
    seq_len; "search" is the search's own text; a mix draws each share and shuffles it (the held-out tail draws
    from every source)."""
    from types import SimpleNamespace

    from diep_lightning.callbacks import RouterCalibration
    from diep_lightning.data import CalibrationDataModule

    serving = tmp_path / "serving.txt"
    serving.write_text("The zebra crossed the quartz river at dawn. " * 400)
    datamodule = CalibrationDataModule(tokenizer="models/tiny-mixtral", num_samples=8, seq_len=32, batch_size=4)
    trainer = SimpleNamespace(datamodule=datamodule)
    [batch] = RouterCalibration(sources=[str(serving)], num_samples=3).batches(trainer)
    tokens = batch["input_ids"]
    assert tuple(tokens.shape) == (3, 32)
    text = datamodule.tokenizer.decode(tokens[0])
    assert "zebra" in text and "quartz" in text
    search = datamodule.calibration_tokens()
    assert torch.equal(RouterCalibration(sources="search").batches(trainer)[0]["input_ids"], search)
    [mixed] = RouterCalibration(sources=["search", str(serving)], weights=[3, 1]).batches(trainer)
    rows = {tuple(r.tolist()) for r in mixed["input_ids"]}
    assert len(mixed["input_ids"]) == 8 and len(rows & {tuple(r.tolist()) for r in search}) == 6
    assert RouterCalibration().sources == ["generated"]


def test_generated_text_is_the_models_own_seeded_samples_and_the_cache_changes_nothing():
    """``sample_sequences`` with the KV cache draws the same tokens as recomputing every prefix would, for
    every family, and the same seed gives the same text."""
    from diep_lightning.router_calibration import sample_sequences, start_token

    for model_type in sorted(TINY_CONFIGS):
        model = tiny_model(model_type)
        start = start_token(model)
        start = 1 if start is None else start
        tokens = sample_sequences(model, 3, 10, start, seed=5, batch_size=2)
        assert tokens.shape == (3, 10) and bool((tokens[:, 0] == start).all()), model_type
        assert torch.equal(tokens, sample_sequences(model, 3, 10, start, seed=5, batch_size=2))
        generator, slow = torch.Generator().manual_seed(5), []
        with torch.no_grad():
            for first in range(0, 3, 2):  # without the cache: the whole prefix every step
                x = torch.full((min(2, 3 - first), 1), start)
                for _ in range(9):
                    probs = torch.softmax(model(input_ids=x, use_cache=False).logits[:, -1].float(), -1)
                    x = torch.cat([x, torch.multinomial(probs, 1, generator=generator)], 1)
                slow.append(x)
        assert torch.equal(tokens, torch.cat(slow)), model_type
    half = sample_sequences(tiny_model("mixtral").to(torch.bfloat16), 2, 6, 1)  # bf16 weights, float32 sampling
    assert half.shape == (2, 6) and half.dtype == torch.long and bool((half >= 0).all())
