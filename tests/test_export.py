"""Exports: round trips, counts, stock loading, atomic writes, merging equals pruning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from diep_lightning import load_pruned
from diep_lightning.export import apply_plan, atomic_directory, export_pruned, size_report
from diep_lightning.families import get_family
from diep_lightning.pruning import PruningPlan, select_experts
from diep_lightning.testing import tiny_model

TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _scores(model):
    """Scores that make global pruning non-uniform (the second layer scores higher)."""
    family = get_family(model)
    if model.config.model_type == "deepseek_v3":  # keep router groups even (2 groups of 4) so routing is exact
        return [torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]), torch.tensor([0.5, 2, 2, 2, 0.5, 2, 2, 2])]
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(b.num_experts, generator=gen) + 0.5 * b.index for b in family.blocks(model)]


def _plan(model, sparsity, mode="global"):
    blocks = get_family(model).blocks(model)
    return select_experts(_scores(model), sparsity, [b.top_k for b in blocks], mode)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_round_trip_equals_in_memory_and_masked_original(model_type, tmp_path):
    original = tiny_model(model_type)
    family = get_family(original)
    plan = _plan(original, 0.375)
    counts = [len(k) for k in plan.kept]
    assert len(set(counts)) > 1, "the test needs a non-uniform plan"
    pruned = copy.deepcopy(original)
    sizes = size_report(pruned)
    apply_plan(pruned, plan)
    in_memory = _logits(pruned)
    # equal to the original with the pruned experts masked out of routing
    blocks = family.blocks(original)
    import contextlib

    with contextlib.ExitStack() as stack:
        for block, removed in zip(blocks, plan.removed):
            stack.enter_context(family.masked_routing(block, removed))
        masked = _logits(original)
    torch.testing.assert_close(in_memory, masked, atol=1e-5, rtol=0)
    path, _ = export_pruned(pruned, plan, tmp_path / "export", source="tiny", original=sizes)
    loaded = load_pruned(path)
    torch.testing.assert_close(_logits(loaded), in_memory, atol=1e-6, rtol=0)
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    torch.testing.assert_close(_logits(remote), in_memory, atol=1e-6, rtol=0)
    record = json.loads((path / "pruning.json").read_text())
    assert [layer["kept"] for layer in record["layers"]] == plan.kept
    assert (path / "modeling_diep.py").is_file() and (path / "experts_per_layer.png").is_file()


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_counts_and_bytes(sparsity):
    model = tiny_model("mixtral")
    plan = _plan(model, sparsity)
    total = sum(len(s) for s in plan.scores)
    assert plan.num_removed == round(sparsity * total)
    assert all(len(k) >= 2 for k in plan.kept)
    before = size_report(model)
    apply_plan(model, plan)
    after = size_report(model)
    assert after["expert_bytes"] == before["expert_bytes"] * (total - plan.num_removed) // total


def test_global_pruning_respects_top_k_when_scores_concentrate():
    scores = [torch.zeros(8), torch.ones(8)]  # layer 0 scores lowest everywhere
    plan = select_experts(scores, 0.5, [2, 2], "global")
    assert [len(k) for k in plan.kept] == [2, 6]
    with pytest.raises(ValueError, match="sparsity"):
        select_experts(scores, 0.9, [2, 2], "global")


def test_uniform_export_loads_with_stock_transformers(tmp_path):
    model = tiny_model("mixtral")
    plan = _plan(model, 0.25, mode="uniform")
    sizes = size_report(model)
    apply_plan(model, plan)
    path, _ = export_pruned(model, plan, tmp_path / "uniform", source="tiny", original=sizes)
    assert not (path / "modeling_diep.py").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["num_local_experts"] == 6 and "auto_map" not in config
    stock = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(_logits(stock), _logits(model), atol=1e-6, rtol=0)


def test_uniform_sparsity_below_top_k_is_refused():
    with pytest.raises(ValueError, match="uniform mode.*top-k"):
        select_experts([torch.rand(4)], 0.75, [2], "uniform")


def test_merging_with_all_weight_on_survivor_equals_pruning():
    model = tiny_model("qwen2_moe")
    plan = _plan(model, 0.25)
    merged_plan = PruningPlan.from_dict(plan.to_dict())
    merged_plan.merges = [{k[0]: {"members": [k[0], *r], "weights": [1.0] + [0.0] * len(r)}} if r else {}
                          for k, r in zip(plan.kept, plan.removed)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply_plan(a, plan)
    apply_plan(b, merged_plan)
    assert torch.equal(_logits(a), _logits(b))


def test_export_never_overwrites_and_leaves_no_partial_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="export_dir"):
        with atomic_directory(target, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "new", overwrite=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "keep.txt").read_text() == "precious"


def test_mismatched_pruning_json_is_refused(tmp_path):
    model = tiny_model("mixtral")
    plan = _plan(model, 0.375)
    sizes = size_report(model)
    apply_plan(model, plan)
    path, _ = export_pruned(model, plan, tmp_path / "e", source="tiny", original=sizes)
    record = json.loads((path / "pruning.json").read_text())
    record["layers"][0]["kept"] = record["layers"][0]["kept"][:-1]
    (path / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="pruning.json"):
        load_pruned(path)


def test_lm_eval_cli_runs_a_kit_task_on_a_non_uniform_export(tmp_path, tiny_tokenizer):
    import subprocess
    import sys

    model = tiny_model("mixtral", vocab_size=len(tiny_tokenizer))
    plan = _plan(model, 0.375)
    sizes = size_report(model)
    apply_plan(model, plan)
    path, _ = export_pruned(model, plan, tmp_path / "export", source="tiny", original=sizes, tokenizer=tiny_tokenizer)
    tasks = tmp_path / "tasks"
    subprocess.run([sys.executable, "-m", "diep_lightning.evaluation", "--render", str(tasks)], check=True,
                   capture_output=True, timeout=300)
    result = subprocess.run(["lm_eval", "--model", "hf", "--model_args", f"pretrained={path},trust_remote_code=True",
                             "--tasks", "kit_blimp_causative", "--include_path", str(tasks), "--limit", "4"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "causative" in result.stdout and "acc" in result.stdout
