"""``random``: uniform random scores from a seeded generator (with ``mode: uniform``, the usual per-layer random
baseline)."""

from __future__ import annotations

import torch

from diep_lightning.methods.base import Scorer, register_method


@register_method
class RandomScorer(Scorer):
    """Uniform random scores; ``seed`` makes them reproducible."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, family, blocks):
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.rand(b.num_experts, generator=gen) for b in blocks]
