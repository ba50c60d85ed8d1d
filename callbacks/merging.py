"""ExpertMerging: fold each pruned expert into its most similar survivor instead of dropping it (DiEP A.5)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from diep_lightning.callbacks.step import PruningStep
from diep_lightning.data import first_batches
from diep_lightning.merging import MergeGroups, merge_config, merge_groups, plan_merges
from diep_lightning.pruning import PruningPlan


class ExpertMerging(PruningStep):
    """Merge pruned experts into survivors, chosen by linear CKA of expert outputs on calibration tokens.

    Runs inside :class:`GlobalExpertPruning` after the experts to remove are chosen and before they are
    removed (the work is :func:`diep_lightning.merging.plan_merges`). Each pruned expert joins the survivor
    whose outputs are most similar; within a group the merge weights are ``softmax(similarity / temperature)``
    with the survivor's self-similarity 1; the survivor's weights become the weighted sum and it keeps its router
    row. Override :meth:`merge_groups` to change how a block's groups are formed.

    Args:
        temperature: softmax temperature of the merge weights (lower: closer to plain pruning).
        max_tokens: calibration tokens per layer used for CKA.
        num_batches: calibration batches taken from the datamodule's train loader.
    """

    order = 10

    def __init__(self, temperature: float = 1.0, max_tokens: int = 4096, num_batches: int = 4) -> None:
        super().__init__()
        settings = merge_config(temperature, max_tokens)
        if num_batches <= 0:
            raise ValueError(f"num_batches: must be > 0, got {num_batches!r}")
        self.temperature, self.max_tokens = settings["temperature"], settings["max_tokens"]
        self.num_batches = int(num_batches)
        self.groups: list[MergeGroups] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from diep_lightning.callbacks.pruning import GlobalExpertPruning

        if stage == "fit" and not any(isinstance(c, GlobalExpertPruning) for c in trainer.callbacks):
            raise ValueError("ExpertMerging: nothing is pruned, so there is nothing to merge; add the "
                             "GlobalExpertPruning callback or drop ExpertMerging")

    def on_experts_selected(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                            plan: PruningPlan) -> None:
        batches = first_batches(trainer.datamodule, self.num_batches)
        self.groups = plan_merges(model, plan, batches, self.temperature, self.max_tokens, self.merge_groups)

    def merge_groups(self, family: Any, block: Any, observation: Any, kept: list[int],
                     removed: list[int]) -> MergeGroups:
        """Assign each removed expert of one block to its most similar survivor and compute the merge weights."""
        return merge_groups(family, block, observation, kept, removed, self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [{str(k): v for k, v in g.items()} for g in self.groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.groups = [{int(k): v for k, v in g.items()} for g in state_dict.get("groups", [])]
