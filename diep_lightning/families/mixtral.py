"""Mixtral: softmax router, top-2 renormalised, 8 experts, no shared expert. The reference layout."""

from diep_lightning.families.base import MoEFamily
from diep_lightning.families.registry import register_family


@register_family
class MixtralFamily(MoEFamily):
    """``MixtralForCausalLM``: ``layer.mlp.gate`` routes, ``layer.mlp.experts`` computes."""

    model_types = ("mixtral",)
    num_experts_config_attr = "num_local_experts"
