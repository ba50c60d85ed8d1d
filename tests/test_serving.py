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
                                         layer_index, pad_attention_weights, padded_head_size, served_counts)
from diep_lightning.serving.skipping import ServedSkipping, layer_thresholds, redirect_skipped
from diep_lightning.skipping import install_skipping
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


def test_a_head_size_the_kernel_lacks_is_served_at_the_next_supported_one():
    cpu = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]
    assert padded_head_size(40, cpu) == 64 and padded_head_size(64, cpu) == 64 and padded_head_size(40, None) == 40
    with pytest.raises(ValueError, match="head_dim: 600 is above"):
        padded_head_size(600, cpu)


def _rope(x, rotary_dim, positions):
    """Neox-style rotary embedding on the first ``rotary_dim`` dimensions (halves paired), the rest untouched."""
    half = rotary_dim // 2
    freqs = positions[:, None].float() / (10000 ** (torch.arange(half).float() / half))
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _attention(weights, heads, kv_heads, head_dim, rotary_dim, scale, x):
    t = x.shape[0]
    q = (x @ weights["q_proj.weight"].T + weights["q_proj.bias"]).view(t, heads, head_dim).transpose(0, 1)
    k = (x @ weights["k_proj.weight"].T + weights["k_proj.bias"]).view(t, kv_heads, head_dim).transpose(0, 1)
    v = (x @ weights["v_proj.weight"].T + weights["v_proj.bias"]).view(t, kv_heads, head_dim).transpose(0, 1)
    pos = torch.arange(t)
    q, k = _rope(q, rotary_dim, pos), _rope(k, rotary_dim, pos)
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(0, 1).reshape(t, heads * head_dim) @ weights["o_proj.weight"].T


def test_zero_padded_heads_give_the_same_attention_output():
    torch.manual_seed(0)
    hidden, heads, kv_heads, head_dim = 160, 4, 2, 40
    weights = {"q_proj.weight": torch.randn(heads * head_dim, hidden), "q_proj.bias": torch.randn(heads * head_dim),
               "k_proj.weight": torch.randn(kv_heads * head_dim, hidden), "k_proj.bias": torch.randn(kv_heads * head_dim),
               "v_proj.weight": torch.randn(kv_heads * head_dim, hidden), "v_proj.bias": torch.randn(kv_heads * head_dim),
               "o_proj.weight": torch.randn(hidden, heads * head_dim)}
    named = [(f"model.layers.0.self_attn.{k}", v) for k, v in weights.items()]
    padded = {k.split("self_attn.")[1]: v for k, v in pad_attention_weights(named, head_dim, 64)}
    assert padded["q_proj.weight"].shape == (heads * 64, hidden) and padded["o_proj.weight"].shape == (hidden, heads * 64)
    x = torch.randn(7, hidden)
    reference = _attention(weights, heads, kv_heads, head_dim, head_dim, head_dim ** -0.5, x)
    served = _attention(padded, heads, kv_heads, 64, head_dim, head_dim ** -0.5, x)
    torch.testing.assert_close(served, reference, rtol=1e-4, atol=1e-4)
    # the scale must stay the model's own: the padded size's would change the scores
    assert not torch.allclose(_attention(padded, heads, kv_heads, 64, head_dim, 64 ** -0.5, x), reference, atol=1e-3)


def test_recorded_skipping_maps_moe_blocks_to_decoder_layers():
    record = {"plan": {"skipping": {"gammas": {"0": [[1.0, 0.5, 0.2]] * 3, "1": [[0.3, 0.4]] * 2},
                                    "renormalize": True}}}
    thresholds, renormalize = layer_thresholds(record, [0, 3, 2])
    assert sorted(thresholds) == [1, 2] and renormalize is True
    assert torch.equal(thresholds[1], torch.tensor([[0.0, 0.5, 0.2], [1.0, 0.0, 0.2], [1.0, 0.5, 0.0]]))
    assert layer_thresholds({"plan": {}}, [3]) == ({}, False) and layer_thresholds(None, [3]) == ({}, False)
    with pytest.raises(ValueError, match=r"^pruning.json: skipping thresholds of MoE layer 1 are \(2, 2\), its "
                                         r"decoder layer 2 has 4 experts$"):
        layer_thresholds(record, [0, 3, 4])
    with pytest.raises(ValueError, match="^pruning.json: skipping recorded for MoE layer 1, the model has 1 MoE"):
        layer_thresholds(record, [3, 0])


def test_a_config_without_per_layer_counts_is_served_with_its_sparse_layers():
    assert served_counts(_Config(num_experts_per_layer=[0, 3], num_hidden_layers=2), "num_experts") == [0, 3]
    assert served_counts(_Config(num_local_experts=8, num_hidden_layers=3), "num_local_experts") == [8, 8, 8]
    qwen = _Config(num_experts=6, num_hidden_layers=6, mlp_only_layers=[0], decoder_sparse_step=2)
    assert served_counts(qwen, "num_experts") == [0, 6, 0, 6, 0, 6]
    with pytest.raises(ValueError, match="no per-layer expert counts"):
        served_counts(_Config(num_hidden_layers=2), "num_experts")


@pytest.mark.parametrize("model_type", sorted(SERVED))
def test_redirected_routing_gives_what_skipping_gives(model_type):
    """The engine-side rewrite (skipped slot -> the token's top expert at weight 0) through the stock experts
    equals transformers-side skipping (sentinel slots left uncomputed), and really moves slots."""
    model = tiny_model(model_type)
    block = get_family(model).blocks(model)[0]
    n, k = block.num_experts, block.top_k
    g = torch.Generator().manual_seed(1)
    gamma = torch.rand(n, n, generator=g) * 1.2
    hidden = torch.randn(64, model.config.hidden_size, generator=g)
    weights, ids = torch.rand(64, n, generator=g).softmax(-1).topk(k)
    for renormalize in (False, True):
        group = install_skipping(model, {block.index: gamma}, renormalize=renormalize)
        with torch.no_grad():
            skipped = block.experts(hidden, ids, weights)
        group.remove()
        new_w, new_ids = redirect_skipped(gamma.clone().fill_diagonal_(0), weights, ids.int(), renormalize)
        moved = new_ids.long() != ids
        assert new_ids.dtype == torch.int32 and 0.1 < moved.float().mean() < 0.9, moved.float().mean()
        top = ids.gather(-1, weights.argmax(-1, keepdim=True)).expand_as(ids)
        assert torch.equal(new_ids.long()[moved], top[moved]) and bool((new_w[moved] == 0).all())
        with torch.no_grad():
            redirected = block.experts(hidden, new_ids.long(), new_w)
        torch.testing.assert_close(redirected, skipped, rtol=1e-5, atol=1e-6)


def test_served_skipping_switches_off_and_counts_only_when_asked():
    g = torch.Generator().manual_seed(2)
    thresholds = (torch.rand(8, 8, generator=g) * 1.5).fill_diagonal_(0)
    weights, ids = torch.rand(32, 8, generator=g).softmax(-1).topk(2)
    state = ServedSkipping([3])
    on = redirect_skipped(thresholds, weights, ids, state=state, layer=3)
    assert not torch.equal(on[1], ids) and state.skipped_share() is None  # not counting: nothing kept
    state.counting = True
    redirect_skipped(thresholds, weights, ids, state=state, layer=3)
    moved = (on[1] != ids).sum().item()
    assert state.skipped_share() == moved / ids.numel() and int(state.slots[3]) == ids.numel()
    assert state.experts_read_share() == on[1].unique().numel() / ids.unique().numel() <= 1
    state.enabled = False
    off_w, off_ids = redirect_skipped(thresholds, weights, ids, state=state, layer=3)
    assert off_w is weights and off_ids is ids and int(state.slots[3]) == ids.numel()
    state.reset_counts()
    assert state.skipped_share() is None and state.experts_read_share() is None


def test_an_export_whose_served_counts_disagree_with_its_record_is_refused_in_one_line(tmp_path):
    """vLLM builds layers from num_experts_per_layer, transformers from diep_layers: an edit to one alone is caught
    when the export is read (the plugin reads it the same way), naming the field."""
    from diep_lightning.record import read_pruning_record

    path, plan, config = _export(tmp_path, "mixtral", "global")
    read_pruning_record(path)
    edited = [c + 1 if c else c for c in config["num_experts_per_layer"]]
    (path / "config.json").write_text(json.dumps({**config, "num_experts_per_layer": edited}))
    with pytest.raises(ValueError, match=r"^num_experts_per_layer: config.json of .* keeps \["):
        read_pruning_record(path)
    with pytest.raises(ValueError, match="^num_experts_per_layer:"):
        load_pruned(path)
    (path / "config.json").write_text(json.dumps({**config, "num_experts_per_layer": 6}))
    with pytest.raises(ValueError, match="^num_experts_per_layer: config.json of .* has 6"):
        read_pruning_record(path)


def test_router_weights_of_the_wrong_size_are_refused_before_vllm_loads_them():
    from diep_lightning.serving.plan import check_router_rows

    counts = [0, 3, 5]
    good = [("model.layers.1.mlp.gate.weight", torch.zeros(3, 4)), ("model.layers.2.mlp.gate.weight", torch.zeros(5, 4)),
            ("model.layers.1.mlp.shared_expert_gate.weight", torch.zeros(1, 4)),
            ("model.layers.0.mlp.gate_proj.weight", torch.zeros(8, 4))]
    assert [name for name, _ in check_router_rows(iter(good), counts)] == [name for name, _ in good]
    bad = [("model.layers.2.block_sparse_moe.gate.weight", torch.zeros(4, 4))]
    with pytest.raises(ValueError, match="^num_experts_per_layer: decoder layer 2 is built with 5 experts but the "
                                         "weights' router model.layers.2.block_sparse_moe.gate.weight has 4 rows"):
        list(check_router_rows(iter(bad), counts))


def test_vllms_front_end_refuses_a_bad_export_in_one_line(tmp_path, monkeypatch):
    """The plugin's config hook runs in the process that makes vLLM's config, before an engine starts: on vLLM's own
    command line a refusal is the one line it exits with, inside a user's Python an ExportRefused with that line."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from diep_lightning.serving.vllm_models import ExportRefused, _one_line, check_export, vllm_command_line

    path, _, config = _export(tmp_path, "mixtral", "global")
    served = SimpleNamespace(model=str(path), hf_config=AutoConfig.from_pretrained(path))
    assert check_export(served, "mixtral") == config["num_experts_per_layer"]
    with pytest.raises(ValueError, match="^architectures: .* phimoe is not supported yet"):
        check_export(served, "phimoe")
    edited = [c + 1 for c in config["num_experts_per_layer"]]
    (path / "config.json").write_text(json.dumps({**config, "num_experts_per_layer": edited}))
    served.hf_config = AutoConfig.from_pretrained(path)
    assert vllm_command_line(["/venv/bin/vllm", "serve"])
    assert vllm_command_line(["/venv/lib/site-packages/vllm/entrypoints/openai/api_server.py"])
    assert not vllm_command_line(["my_script.py"]) and not vllm_command_line([])
    monkeypatch.setattr("sys.argv", ["my_script.py"])
    with pytest.raises(ExportRefused, match="^num_experts_per_layer: config.json of"), _one_line():
        check_export(served, "mixtral")
    monkeypatch.setattr("sys.argv", ["/venv/bin/vllm", "serve"])
    with pytest.raises(SystemExit) as exited, _one_line():
        check_export(served, "mixtral")
    assert str(exited.value.code).startswith("error: num_experts_per_layer: config.json of")
    assert "\n" not in str(exited.value.code)
    (path / "config.json").write_text(json.dumps(config))
    served.hf_config = AutoConfig.from_pretrained(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ValueError, match="^model.safetensors: .* is cut short or damaged"):
        check_export(served, "mixtral")
