"""PhiMoE (Phi-3.5-MoE): sparsemixer routing, defined for top-2 only, and random routing in train mode.

The sparsemixer draws random experts while the module is in training mode, so the frozen model must stay
in ``eval()`` during the search (the LightningModule keeps it there). The router is an ``nn.Linear``
subclass, so removal also updates its ``out_features``.
"""

from diep_lightning.families.base import MoEFamily
from diep_lightning.families.registry import register_family


@register_family
class PhimoeFamily(MoEFamily):
    """``PhimoeForCausalLM``: ``mlp.router`` (sparsemixer) and ``mlp.experts``."""

    model_types = ("phimoe",)
    router_attr = "router"
    num_experts_config_attr = "num_local_experts"
    max_top_k = 2
