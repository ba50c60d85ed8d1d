"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): fine-grained experts plus one shared expert behind a sigmoid gate.

The shared expert is always on and is not a pruning candidate; DiEP's scaling and pruning act on the
routed experts only. Layers listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``) are dense and
are skipped by block discovery.
"""

from diep_lightning.families.base import MoEFamily
from diep_lightning.families.registry import register_family


@register_family
class Qwen2MoeFamily(MoEFamily):
    """``Qwen2MoeForCausalLM``: ``mlp.gate`` (softmax, optional top-k renorm), ``mlp.experts``,
    ``mlp.shared_expert`` and ``mlp.shared_expert_gate``."""

    model_types = ("qwen2_moe",)
    #: the shared expert's sigmoid gate is a router too (one row per block): calibration may train it
    calibration_groups = ("router", "norm", "attention_norm", "shared_gate")
    num_experts_config_attr = "num_experts"
    has_shared_experts = True

    def _calibration_parameters(self, block, group):  # noqa: ANN001, ANN202
        if group == "shared_gate":
            return dict(block.module.shared_expert_gate.named_parameters(recurse=False))
        return super()._calibration_parameters(block, group)
