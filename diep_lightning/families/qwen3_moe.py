"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): 128 fine-grained experts, top-8, softmax router, no shared expert."""

from diep_lightning.families.base import MoEFamily
from diep_lightning.families.registry import register_family


@register_family
class Qwen3MoeFamily(MoEFamily):
    """``Qwen3MoeForCausalLM``: same block layout as Mixtral with ``norm_topk_prob`` on the router."""

    model_types = ("qwen3_moe",)
    num_experts_config_attr = "num_experts"
