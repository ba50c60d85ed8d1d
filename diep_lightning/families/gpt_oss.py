"""gpt-oss: router with a bias (top-k of logits, softmax over the chosen), experts stored transposed
((E, H, 2I) and (E, I, H)) with interleaved gate/up columns and per-expert biases.

Every expert tensor, biases included, is indexed by expert on dim 0, so the shared removal and merging
code slices and averages them correctly; the router bias is sliced with the router rows. The block
(``GptOssMLP``) returns ``(hidden, router_scores)``.
"""

from diep_lightning.families.base import MoEFamily
from diep_lightning.families.registry import register_family


@register_family
class GptOssFamily(MoEFamily):
    """``GptOssForCausalLM``: ``mlp.router`` (weight + bias) and ``mlp.experts``."""

    model_types = ("gpt_oss",)
    eager_skips_sentinel = False  # its eager forward one-hots with N classes
    router_attr = "router"
    unit_layout = {"gate_up_proj": (1, 1, 2), "gate_up_proj_bias": (0, 1, 2), "down_proj": (0, 1, 1)}
    num_experts_config_attr = "num_local_experts"
