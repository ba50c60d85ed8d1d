"""Exports: round trips against the in-memory and masked model, stock loading, the evaluation CLI on an export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import logits, plan_for

from diep_lightning import load_pruned
from diep_lightning.export import export_pruned
from diep_lightning.removal import apply_plan, size_report
from diep_lightning.families import get_family
from diep_lightning.testing import tiny_model

@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_round_trip_equals_in_memory_and_masked_original(model_type, tmp_path):
    original = tiny_model(model_type)
    family = get_family(original)
    plan = plan_for(original, 0.375)
    counts = [len(k) for k in plan.kept]
    assert len(set(counts)) > 1, "the test needs a non-uniform plan"
    pruned = copy.deepcopy(original)
    sizes = size_report(pruned)
    apply_plan(pruned, plan)
    in_memory = logits(pruned)
    # equal to the original with the pruned experts masked out of routing
    blocks = family.blocks(original)
    import contextlib

    with contextlib.ExitStack() as stack:
        for block, removed in zip(blocks, plan.removed):
            stack.enter_context(family.masked_routing(block, removed))
        masked = logits(original)
    torch.testing.assert_close(in_memory, masked, atol=1e-5, rtol=0)
    path, _ = export_pruned(pruned, plan, tmp_path / "export", source="tiny", original=sizes)
    loaded = load_pruned(path)
    torch.testing.assert_close(logits(loaded), in_memory, atol=1e-6, rtol=0)
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    torch.testing.assert_close(logits(remote), in_memory, atol=1e-6, rtol=0)
    record = json.loads((path / "pruning.json").read_text())
    assert [layer["kept"] for layer in record["layers"]] == plan.kept
    assert (path / "modeling_diep.py").is_file() and (path / "experts_per_layer.png").is_file()


def test_uniform_export_loads_with_stock_transformers(tmp_path):
    model = tiny_model("mixtral")
    plan = plan_for(model, 0.25, mode="uniform")
    sizes = size_report(model)
    apply_plan(model, plan)
    path, _ = export_pruned(model, plan, tmp_path / "uniform", source="tiny", original=sizes)
    assert not (path / "modeling_diep.py").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["num_local_experts"] == 6 and "auto_map" not in config
    stock = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(stock), logits(model), atol=1e-6, rtol=0)


def test_lm_eval_cli_runs_a_kit_task_on_a_non_uniform_export(tmp_path, tiny_tokenizer):
    import subprocess
    import sys

    model = tiny_model("mixtral", vocab_size=len(tiny_tokenizer))
    plan = plan_for(model, 0.375)
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
