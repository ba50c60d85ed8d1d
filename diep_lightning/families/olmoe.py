"""OLMoE (OLMoE-1B-7B): 64 experts, top-8, softmax router without top-k renormalisation by default."""

from diep_lightning.families.base import MoEFamily
from diep_lightning.families.registry import register_family


@register_family
class OlmoeFamily(MoEFamily):
    """``OlmoeForCausalLM``: ``mlp.gate`` and ``mlp.experts``."""

    model_types = ("olmoe",)
    num_experts_config_attr = "num_experts"
