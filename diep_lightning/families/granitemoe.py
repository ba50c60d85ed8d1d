"""GraniteMoE: the block lives at ``layer.block_sparse_moe``; the router takes top-k of logits, then a
softmax over the chosen ones."""

from diep_lightning.families.base import MoEFamily
from diep_lightning.families.registry import register_family


@register_family
class GraniteMoeFamily(MoEFamily):
    """``GraniteMoeForCausalLM``: ``block_sparse_moe.router`` and ``block_sparse_moe.experts``."""

    model_types = ("granitemoe",)
    block_attr = "block_sparse_moe"
    router_attr = "router"
    num_experts_config_attr = "num_local_experts"
