"""PruningStep: the typed interface between the pruning callback and the callbacks that take part in pruning.

``GlobalExpertPruning`` calls these methods on every ``PruningStep`` in ``trainer.callbacks``, ordered by their
``order`` (then list order), so that a callback appended on the command line still runs where the pipeline needs
it: merging (10), router calibration (20), skipping (30), then the rest (50); a step overrides the ones it needs. Steps never call each other: what they share is the plan and the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from diep_lightning.pruning import PruningPlan


class PruningStep(Callback):
    """A callback with a say in pruning (merging, skipping, evaluation of the export)."""

    #: where the step runs among the others (lower first); equal orders keep ``trainer.callbacks`` order
    order: int = 50

    def on_experts_selected(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                            plan: PruningPlan) -> None:
        """The plan is chosen and the model is untouched (merging fills ``plan.merges`` here)."""

    def on_experts_removed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                           plan: PruningPlan) -> None:
        """The model is pruned in memory (skipping calibrates here and records its thresholds in ``plan.skipping``)."""

    def on_pruned_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                         export_dir: Path) -> None:
        """The export is on disk (lm-eval scores the pruned model here)."""


def pruning_steps(trainer: pl.Trainer) -> list[PruningStep]:
    """The trainer's pruning steps, by ``order`` and then ``trainer.callbacks`` order."""
    return sorted((c for c in trainer.callbacks if isinstance(c, PruningStep)), key=lambda c: c.order)
