"""``frequency``: how many calibration tokens are routed to each expert (Expert Trimming / M-SMoE style)."""

from __future__ import annotations

import torch

from diep_lightning.methods.base import Scorer, register_method


@register_method
class FrequencyScorer(Scorer):
    """Number of routed tokens per expert."""

    name = "frequency"
    per_layer_scale = True

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}

    def observe(self, family, block, hidden, index, weights):
        counts = torch.bincount(index.flatten().cpu(), minlength=block.num_experts)[: block.num_experts]
        self.counts[block.index] = self.counts.get(block.index, 0) + counts.double()

    def scores(self, family, blocks):
        return [self.counts.get(b.index, torch.zeros(b.num_experts, dtype=torch.float64)).float() for b in blocks]
