"""DeepSeek-V3 / Kimi-K2-style: sigmoid router with a selection bias (``e_score_correction_bias``) and
grouped top-k (group score = sum of its top-2), shared experts, dense first layers.

Masking an expert out of routing goes through the selection bias (-inf), which excludes it from both the
group scores and the top-k while leaving the weights of the others untouched. Groups need at least two
experts each (group scores take a top-2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from diep_lightning.families.base import MoEBlock, MoEFamily
from diep_lightning.families.grouped import regroup_after_removal
from diep_lightning.families.registry import register_family


@register_family
class DeepseekV3Family(MoEFamily):
    """``DeepseekV3ForCausalLM``: ``mlp.gate`` (weight + ``e_score_correction_bias``), ``mlp.experts``,
    ``mlp.shared_experts``."""

    model_types = ("deepseek_v3",)
    num_experts_config_attr = "n_routed_experts"
    has_shared_experts = True

    @contextlib.contextmanager
    def masked_routing(self, block: MoEBlock, expert_ids: Sequence[int]) -> Iterator[None]:
        bias = block.router.e_score_correction_bias
        saved = bias.detach().clone()
        try:
            with torch.no_grad():
                bias[list(expert_ids)] = float("-inf")
            yield
        finally:
            with torch.no_grad():
                bias.copy_(saved)

    def _before_removal(self, block: MoEBlock, keep: list[int]) -> None:
        regroup_after_removal(block, keep, min_group_size=2)
