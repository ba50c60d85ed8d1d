"""DeepSeek-V2 / DeepSeek-MoE-style: softmax router (greedy or group-limited greedy) scaled by
``routed_scaling_factor``, shared experts, and dense first layers (``first_k_dense_replace``)."""

from diep_lightning.families.base import MoEBlock, MoEFamily
from diep_lightning.families.grouped import regroup_after_removal
from diep_lightning.families.registry import register_family


@register_family
class DeepseekV2Family(MoEFamily):
    """``DeepseekV2ForCausalLM``: ``mlp.gate``, ``mlp.experts``, ``mlp.shared_experts``."""

    model_types = ("deepseek_v2",)
    num_experts_config_attr = "n_routed_experts"
    has_shared_experts = True

    def _before_removal(self, block: MoEBlock, keep: list[int]) -> None:
        if getattr(block.router, "topk_method", "greedy") == "group_limited_greedy":
            regroup_after_removal(block, keep)
