"""``ablation``: each expert's score is how much the calibration loss rises when it alone is removed (a
reference: one model evaluation per expert, meant for small models)."""

from __future__ import annotations

import torch

from diep_lightning.methods.base import Scorer, register_method
from diep_lightning.methods.masked_loss import MaskedLoss


@register_method
class AblationScorer(Scorer):
    """One-shot ablation ranking.

    Args:
        max_evaluations: refuse models with more experts than this (one evaluation each).
        reference_tokens: calibration tokens every evaluation runs over.
    """

    name = "ablation"
    wants_batches = True

    def __init__(self, max_evaluations: int = 5000, reference_tokens: int = 8192) -> None:
        self.max_evaluations = max_evaluations
        self.evaluator = MaskedLoss(reference_tokens)

    def setup(self, model, family, blocks):
        self.evaluator.setup(model, family, blocks)

    def observe_batch(self, batch):
        self.evaluator.keep(batch)

    def check(self, blocks, sparsity, mode):
        needed = sum(b.num_experts for b in blocks) + 1
        if needed > self.max_evaluations:
            raise ValueError(f"method: ablation needs {needed} loss evaluations, over max_evaluations="
                             f"{self.max_evaluations}; it is a reference for small models")

    def scores(self, family, blocks):
        base = self.evaluator.loss({})
        return [torch.tensor([self.evaluator.loss({b.index: [e]}) - base for e in range(b.num_experts)])
                for b in blocks]
