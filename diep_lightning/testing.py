"""Tiny random MoE models of every supported family, built from config classes with no download.

Used by the test suite, the benchmark smoke test and anyone who wants to try the pipeline offline. The
sizes are the smallest that still exercise each family's peculiarities (shared experts, dense first layers,
grouped routers, router biases, transposed expert tensors).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

#: Per-family overrides on top of ``_COMMON``: 8 routed experts, top-2 unless the family needs otherwise.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=48,
                      shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[],
                      norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=48,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=24, norm_topk_prob=False),
    "deepseek_v2": dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                        intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        routed_scaling_factor=1.0, num_key_value_heads=4),
    "deepseek_v3": dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                        intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8, n_group=2, topk_group=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=24, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48),
}


def tiny_config(model_type: str, **overrides: Any):
    """A tiny config of the given family (``overrides`` win)."""
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    config._experts_implementation = kwargs.get("experts_implementation", None)
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random fp32 causal LM of the given family, in eval mode, with random routing biases where
    the family has them (so tests see them matter)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and ("bias" in name or "norm" in name):
                param.normal_(0.0 if "bias" in name else 1.0, 0.1)
            elif param.dim() >= 2:
                param.normal_(0.0, 0.2)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    return model.eval()


def save_tiny_model(model_type: str, directory: str, tokenizer: Any, seed: int = 0, **overrides: Any) -> str:
    """Save a tiny random model of the family with ``tokenizer`` (vocab sized to it) into ``directory``."""
    vocab = len(tokenizer)
    model = tiny_model(model_type, seed=seed, vocab_size=vocab, **overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
