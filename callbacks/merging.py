"""ExpertMerging: fold each pruned expert into its most similar survivor instead of dropping it (DiEP A.5, MC-SMoE)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from diep_lightning.callbacks.step import PruningStep
from diep_lightning.data import first_batches
from diep_lightning.merging import MergeGroups, MergeSettings, merge_groups, plan_merges
from diep_lightning.pruning import PruningPlan


class ExpertMerging(PruningStep):
    """Merge pruned experts into survivors, chosen by linear CKA of expert outputs on calibration tokens.

    Runs inside :class:`GlobalExpertPruning` after the experts to remove are chosen and before they are
    removed (the work is :func:`diep_lightning.merging.plan_merges`). Each pruned expert joins the survivor
    whose outputs are most similar; its hidden units are aligned to the survivor's (``align``); the survivor's
    weights become the members' weighted average (``weights``: routing frequency or similarity; the survivor's own
    share chosen among ``shares``) and it keeps its router row. The guard (``guard``) keeps a group merged only where that lowers the pruned layer's output error
    on held-out calibration tokens, so merging is never worse there than plain pruning. Override
    :meth:`merge_groups` to change how a block's groups are formed.

    Args:
        weights: "usage" (routing frequency, MC-SMoE) or "similarity" (softmax of CKA / temperature).
        temperature: softmax temperature of the "similarity" weights.
        align: permute members' hidden units to the survivor's before averaging.
        guard: fold a group only where it lowers the held-out block error.
        holdout: share of the observed tokens held out for the guard.
        shares: the survivor's own shares of its group the guard tries (on the other tokens) before judging it;
            empty: the weights as they come.
        max_tokens: calibration tokens per layer used for CKA, usage and the guard.
        num_batches: calibration batches taken from the datamodule's train loader.
    """

    order = 10

    def __init__(self, weights: str = "usage", temperature: float = 1.0, align: bool = True, guard: bool = True,
                 holdout: float = 0.25, shares: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
                 max_tokens: int = 4096, num_batches: int = 4) -> None:
        super().__init__()
        self.settings = MergeSettings(weights=weights, temperature=temperature, align=align, guard=guard,
                                      holdout=holdout, shares=shares, max_tokens=max_tokens)
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
            raise ValueError(f"num_batches: must be an integer > 0, got {num_batches!r}")
        self.num_batches = int(num_batches)
        self.groups: list[MergeGroups] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from diep_lightning.callbacks.pruning import GlobalExpertPruning

        if stage == "fit" and not any(isinstance(c, GlobalExpertPruning) for c in trainer.callbacks):
            raise ValueError("ExpertMerging: nothing is pruned, so there is nothing to merge; add the "
                             "GlobalExpertPruning callback or drop ExpertMerging")
        family = getattr(pl_module, "family", None)
        if family is not None:
            self.settings.check_family(family)

    def on_experts_selected(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                            plan: PruningPlan) -> None:
        batches = first_batches(trainer.datamodule, self.num_batches)
        self.groups = plan_merges(model, plan, batches, group_fn=self.merge_groups, settings=self.settings)

    def merge_groups(self, family: Any, block: Any, observation: Any, kept: list[int],
                     removed: list[int]) -> MergeGroups:
        """Assign each removed expert of one block to its most similar survivor and compute the merge weights."""
        return merge_groups(family, block, observation, kept, removed, self.settings.temperature,
                            self.settings.weights)

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [{str(k): v for k, v in g.items()} for g in self.groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.groups = [{int(k): v for k, v in g.items()} for g in state_dict.get("groups", [])]
