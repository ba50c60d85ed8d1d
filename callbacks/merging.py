"""ExpertMerging: fold each pruned expert into its most similar survivor instead of dropping it (DiEP A.5)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from diep_lightning.calibration import expert_outputs, linear_cka, observe_blocks
from diep_lightning.pruning import PruningPlan


class ExpertMerging(Callback):
    """Merge pruned experts into survivors, chosen by linear CKA of expert outputs on calibration tokens.

    Runs inside :class:`GlobalExpertPruning` after the experts to remove are chosen and before they are
    removed. Each pruned expert joins the survivor whose outputs are most similar (linear CKA on the same
    tokens); within a group the merge weights are ``softmax(similarity / temperature)`` with the survivor's
    self-similarity 1; the survivor's weights become the weighted sum and it keeps its router row.

    Args:
        temperature: softmax temperature of the merge weights (lower: closer to plain pruning).
        max_tokens: calibration tokens per layer used for CKA.
        num_batches: calibration batches taken from the datamodule's train loader.
    """

    def __init__(self, temperature: float = 1.0, max_tokens: int = 4096, num_batches: int = 4) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature!r}")
        if max_tokens <= 0 or num_batches <= 0:
            raise ValueError(f"max_tokens/num_batches: must be > 0, got {max_tokens!r}/{num_batches!r}")
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.num_batches = int(num_batches)
        self.groups: list[dict[int, dict[str, list[float]]]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from diep_lightning.callbacks.pruning import GlobalExpertPruning

        if stage == "fit" and not any(isinstance(c, GlobalExpertPruning) for c in trainer.callbacks):
            raise ValueError("ExpertMerging: nothing is pruned, so there is nothing to merge; add the "
                             "GlobalExpertPruning callback or drop ExpertMerging")

    def on_experts_selected(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                            plan: PruningPlan) -> None:
        if plan.num_removed == 0:
            raise ValueError("ExpertMerging: nothing was pruned, so there is nothing to merge; raise sparsity or "
                             "drop the ExpertMerging callback")
        batches = calibration_batches(trainer, self.num_batches)
        family = pl_module.family
        observations = observe_blocks(model, family, batches, self.max_tokens)
        plan.merges = [self.merge_groups(family, block, observations[block.index], plan.kept[block.index],
                                         plan.removed[block.index]) if plan.removed[block.index] else {}
                       for block in family.blocks(model)]
        self.groups = plan.merges

    def merge_groups(self, family: Any, block: Any, observation: Any, kept: list[int],
                     removed: list[int]) -> dict[int, dict[str, list[float]]]:
        """Assign each removed expert to its most similar survivor and compute the merge weights."""
        outputs = expert_outputs(family, block, observation)
        similarity = {(r, k): linear_cka(outputs[r], outputs[k]) for r in removed for k in kept}
        members: dict[int, list[int]] = {}
        for r in removed:
            best = max(kept, key=lambda k: similarity[(r, k)])
            members.setdefault(best, []).append(r)
        groups = {}
        for survivor, extra in members.items():
            sims = torch.tensor([1.0] + [similarity[(r, survivor)] for r in extra])
            weights = torch.softmax(sims / self.temperature, dim=0)
            groups[survivor] = {"members": [survivor, *extra], "weights": [float(w) for w in weights],
                                "similarity": [float(s) for s in sims]}
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [{str(k): v for k, v in g.items()} for g in self.groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.groups = [{int(k): v for k, v in g.items()} for g in state_dict.get("groups", [])]


def calibration_batches(trainer: pl.Trainer, num_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_batches`` batches of the datamodule's calibration (train) loader."""
    datamodule = trainer.datamodule
    if datamodule is None:
        raise ValueError("trainer.datamodule: calibration callbacks need the CalibrationDataModule; pass "
                         "--data.* options or a datamodule to fit()")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) >= num_batches:
            break
    return batches
