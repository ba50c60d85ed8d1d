"""``reap``: mean over routed tokens of router weight x L2 norm of the expert's output (REAP, Cerebras 2025;
with the default weighting equal to llm-compressor's ``REAPPruningModifier``)."""

from __future__ import annotations

import torch

from diep_lightning.methods.base import Scorer, register_method


@register_method
class ReapScorer(Scorer):
    """Mean over routed tokens of (router weight x L2 norm of the expert's output).

    Args:
        weighting: "routing" (default, llm-compressor): the weight the expert gets in the block's output (for
            Mixtral the top-k renormalised softmax); "softmax" (Cerebras' own code for Mixtral): the raw softmax
            probability over all experts.
    """

    name = "reap"
    per_layer_scale = True

    def __init__(self, weighting: str = "routing") -> None:
        if weighting not in ("routing", "softmax"):
            raise ValueError(f"reap_weighting: expected 'routing' or 'softmax', got {weighting!r}")
        self.weighting = weighting
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def observe(self, family, block, hidden, index, weights):
        if self.weighting == "softmax":
            logits = torch.nn.functional.linear(hidden, family.router_weight(block)).float()
            bias = getattr(block.router, "bias", None)
            logits = logits + bias.float() if isinstance(bias, torch.Tensor) else logits
            weights = torch.softmax(logits, dim=-1).gather(-1, index.clamp_max(block.num_experts - 1))
        n = block.num_experts
        sums = self.sums.setdefault(block.index, torch.zeros(n, dtype=torch.float64))
        counts = self.counts.setdefault(block.index, torch.zeros(n, dtype=torch.float64))
        for e in index.unique().tolist():
            if e >= n:
                continue
            token, slot = (index == e).nonzero(as_tuple=True)
            out = family.expert_outputs(block, hidden[token], [e])[0]
            sums[e] += float((out.float().norm(dim=-1) * weights[token, slot].float()).sum())
            counts[e] += token.numel()

    def scores(self, family, blocks):
        return [(self.sums.get(b.index, torch.zeros(b.num_experts)) /
                 self.counts.get(b.index, torch.ones(b.num_experts)).clamp_min(1)).float() for b in blocks]
