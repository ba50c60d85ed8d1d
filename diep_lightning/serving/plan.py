"""What the vLLM plugin needs to know about a non-uniform export, without importing vLLM (so it is tested
everywhere): which families it serves, each decoder layer's expert count, and the settings it refuses."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch

#: The config field that carries a non-uniform export's routed-expert count per decoder layer (0: a dense layer);
#: the name EvoESAP's non-uniform Qwen3-MoE configs use.
PER_LAYER_FIELD = "num_experts_per_layer"

#: model_type -> (vLLM model file, causal-LM class, config attribute with the expert count)
SERVED = {
    "mixtral": ("mixtral", "MixtralForCausalLM", "num_local_experts"),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", "num_experts"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", "num_experts"),
    "olmoe": ("olmoe", "OlmoeForCausalLM", "num_experts"),
}

#: Every architecture name a non-uniform export may carry (``DiEP<stock class>``), served or refused.
EXPORTED = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM", "phimoe": "PhimoeForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
}


def architecture(model_type: str) -> str:
    """The architecture name of a non-uniform export of ``model_type``."""
    return f"DiEP{EXPORTED[model_type]}"


def experts_per_layer(config: Any) -> list[int]:
    """Each decoder layer's routed-expert count from an export's config (0 for a dense layer).

    Raises:
        ValueError: one line when the field is missing or does not fit the model.
    """
    counts = getattr(config, PER_LAYER_FIELD, None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(counts, (list, tuple)) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"{PER_LAYER_FIELD}: the config has no per-layer expert counts (got {counts!r}); serve a "
                         "non-uniform diep_lightning export, or a stock model without this plugin's architecture")
    if layers is not None and len(counts) != layers:
        raise ValueError(f"{PER_LAYER_FIELD}: {len(counts)} entries for {layers} decoder layers; re-export the model")
    if not any(counts):
        raise ValueError(f"{PER_LAYER_FIELD}: no layer has routed experts; re-export the model")
    return list(counts)


def served_counts(config: Any, count_attr: str) -> list[int]:
    """Each decoder layer's routed-expert count the plugin builds: the per-layer field of a non-uniform export, else
    (a uniform export served through the plugin's architecture with ``hf_overrides``, for its skipping) the config's
    one count in every sparse layer, by the family's own rule (``mlp_only_layers``, ``decoder_sparse_step``)."""
    if getattr(config, PER_LAYER_FIELD, None) is not None:
        return experts_per_layer(config)
    count, layers = getattr(config, count_attr, None), getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1 or not isinstance(layers, int):
        return experts_per_layer(config)  # its one-line refusal
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", None) or 1
    return [0 if i in dense or (i + 1) % step else count for i in range(layers)]


_ROUTER_WEIGHT = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")


def check_router_rows(weights: Iterable[tuple[str, torch.Tensor]], counts: list[int]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass ``(name, tensor)`` weights through, refusing in one line a router whose rows are not its layer's count
    (a config edited apart from the weights), before vLLM's own shape assertion would."""
    for name, tensor in weights:
        match = _ROUTER_WEIGHT.search(name)
        if match:
            layer = int(match.group(1))
            expected = counts[layer] if layer < len(counts) else None
            if expected and tensor.shape[0] != expected:
                raise ValueError(f"{PER_LAYER_FIELD}: decoder layer {layer} is built with {expected} experts but the "
                                 f"weights' router {name} has {tensor.shape[0]} rows; the config was edited apart "
                                 "from the weights; re-export the model")
        yield name, tensor


def check_parallelism(counts: list[int], top_k: int | None, expert_parallel_size: int, eplb: bool) -> None:
    """Refuse settings that cannot work with per-layer counts, in one line naming the setting."""
    smallest = min(c for c in counts if c)
    if eplb:
        raise ValueError("enable_eplb: expert load balancing assumes one expert count for every layer; serve this "
                         "non-uniform export without EPLB")
    if expert_parallel_size > smallest:
        raise ValueError(f"enable_expert_parallel: {expert_parallel_size} expert-parallel ranks but the smallest layer "
                         f"keeps {smallest} experts; use at most {smallest} ranks or tensor parallelism")
    if top_k is not None and top_k > smallest:
        raise ValueError(f"{PER_LAYER_FIELD}: a layer keeps {smallest} experts, fewer than top-k={top_k}")


def layer_index(prefix: str) -> int:
    """The decoder-layer index in a vLLM module prefix such as ``model.layers.7``."""
    parts = [p for p in prefix.split(".") if p.isdigit()]
    if not parts:
        raise ValueError(f"prefix: no layer index in {prefix!r}")
    return int(parts[-1])


#: families whose attention the plugin can serve zero-padded to a head size the attention kernel has (attention
#: without per-head norms, so zero dimensions change nothing but the kernel's shape)
PADDABLE = {"qwen2_moe"}


def padded_head_size(head_dim: int, supported: list[int] | None) -> int:
    """The head size to serve ``head_dim`` with: itself when the attention backend supports it (or says nothing),
    else the smallest supported size above it.

    Raises:
        ValueError: one line when no supported size is large enough.
    """
    if not supported or head_dim in supported:
        return head_dim
    larger = sorted(size for size in supported if size > head_dim)
    if not larger:
        raise ValueError(f"head_dim: {head_dim} is above every head size this attention backend supports ({supported})")
    return larger[0]


def pad_heads(tensor: torch.Tensor, head_dim: int, padded: int, dim: int) -> torch.Tensor:
    """Each head's ``head_dim`` slice along ``dim`` followed by zeros up to ``padded``: queries, keys and values
    padded this way give the same attention scores and outputs (the extra dimensions are zero), and an output
    projection padded along its input dimension ignores them."""
    if padded == head_dim:
        return tensor
    heads = tensor.shape[dim] // head_dim
    if heads * head_dim != tensor.shape[dim]:
        raise ValueError(f"head_dim: {tensor.shape[dim]} is not a whole number of heads of size {head_dim}")
    split = tensor.unflatten(dim, (heads, head_dim))
    shape = list(split.shape)
    shape[dim + 1] = padded - head_dim
    return torch.cat([split, split.new_zeros(shape)], dim=dim + 1).flatten(dim, dim + 1)


def pad_attention_weights(weights: Any, head_dim: int, padded: int) -> Any:
    """A checkpoint's (name, tensor) stream with every attention projection padded to ``padded`` per head."""
    for name, tensor in weights:
        if padded != head_dim and ".self_attn." in name:
            if any(f".{proj}." in name for proj in ("q_proj", "k_proj", "v_proj")):
                tensor = pad_heads(tensor, head_dim, padded, 0)
            elif ".o_proj.weight" in name:
                tensor = pad_heads(tensor, head_dim, padded, 1)
        yield name, tensor
