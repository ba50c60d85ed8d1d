"""Exports that say what they are, and the vLLM plugin's per-layer logic (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch

from diep_lightning import load_pruned
from diep_lightning.export import export_pruned
from diep_lightning.families import get_family
from diep_lightning.pipeline import prune
from diep_lightning.serving.plan import (EXPORTED, SERVED, architecture, check_parallelism, experts_per_layer,
                                         layer_index)
from diep_lightning.testing import TINY_CONFIGS, tiny_model


def _export(tmp_path, model_type, mode):
    model = tiny_model(model_type)
    blocks = get_family(model).blocks(model)
    scores = [torch.arange(b.num_experts, dtype=torch.float32) * (1 + 3 * b.index) for b in blocks]
    pruned = prune(model, scores, 0.375, mode)
    path, _ = export_pruned(pruned.model, pruned.plan, tmp_path / f"{model_type}-{mode}", source="tiny",
                            original=pruned.before)
    return path, pruned.plan, json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v2"])
def test_a_non_uniform_config_states_its_per_layer_counts(model_type, tmp_path):
    path, plan, config = _export(tmp_path, model_type, "global")
    family = get_family(tiny_model(model_type))
    kept = iter(len(k) for k in plan.kept)
    expected = [next(kept) if layer.get("num_experts") else 0 for layer in
                [s or {} for s in config["diep_layers"]]]
    assert len({c for c in expected if c}) > 1, "the plan must be non-uniform"
    assert config["num_experts_per_layer"] == expected and len(expected) == config["num_hidden_layers"]
    assert config[family.num_experts_config_attr] == max(expected)
    assert config["architectures"] == [architecture(model_type)]
    assert (expected[0] == 0) == (model_type == "deepseek_v2"), "dense layers are marked 0"
    loaded = load_pruned(path)  # in-process loading still works
    assert [b.num_experts for b in get_family(loaded).blocks(loaded)] == [c for c in expected if c]


def test_a_uniform_export_stays_stock(tmp_path):
    path, plan, config = _export(tmp_path, "mixtral", "uniform")
    assert config["architectures"] == ["MixtralForCausalLM"] and "num_experts_per_layer" not in config
    assert config["num_local_experts"] == len(plan.kept[0]) and "auto_map" not in config


def test_stock_transformers_without_remote_code_refuses_a_non_uniform_export(tmp_path):
    from transformers import AutoModelForCausalLM

    path, _, _ = _export(tmp_path, "mixtral", "global")
    with pytest.raises(Exception, match="mismatch|size"):
        AutoModelForCausalLM.from_pretrained(path)


def test_the_architecture_names_are_the_stock_class_names_with_a_prefix():
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from diep_lightning.testing import tiny_config

    for model_type in TINY_CONFIGS:
        stock = MODEL_FOR_CAUSAL_LM_MAPPING[type(tiny_config(model_type))].__name__
        assert EXPORTED[model_type] == stock
        assert architecture(model_type) == f"DiEP{stock}"
    assert set(SERVED) == {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_per_layer_counts_are_read_and_checked():
    assert experts_per_layer(_Config(num_experts_per_layer=[0, 3, 5], num_hidden_layers=3)) == [0, 3, 5]
    for bad, message in [(_Config(num_hidden_layers=2), "no per-layer expert counts"),
                         (_Config(num_experts_per_layer=[3], num_hidden_layers=2), "1 entries for 2 decoder layers"),
                         (_Config(num_experts_per_layer=[0, 0], num_hidden_layers=2), "no layer has routed experts"),
                         (_Config(num_experts_per_layer=[2, -1], num_hidden_layers=2), "no per-layer")]:
        with pytest.raises(ValueError, match=message):
            experts_per_layer(bad)


def test_settings_that_cannot_work_are_refused_in_one_line():
    check_parallelism([0, 3, 5], 2, expert_parallel_size=3, eplb=False)
    with pytest.raises(ValueError, match="^enable_expert_parallel: 4 expert-parallel ranks .* keeps 3"):
        check_parallelism([0, 3, 5], 2, expert_parallel_size=4, eplb=False)
    with pytest.raises(ValueError, match="^enable_eplb:"):
        check_parallelism([3, 5], 2, expert_parallel_size=1, eplb=True)
    with pytest.raises(ValueError, match="fewer than top-k=4"):
        check_parallelism([3, 5], 4, expert_parallel_size=1, eplb=False)
    assert layer_index("model.layers.7") == 7 and layer_index("language_model.model.layers.12.mlp") == 12


def test_the_plugin_is_registered_as_a_vllm_general_plugin():
    from importlib.metadata import entry_points

    targets = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "diep_lightning"]
    assert targets == ["diep_lightning.serving.vllm_models:register"]
