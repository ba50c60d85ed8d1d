"""BaselineModule: the one no-grad pass over calibration data in which a baseline's scorer watches routing.

Chosen on the command line like any LightningCLI subclass: ``--model=BaselineModule --model.method=reap``.
Pruning, merging, skipping and export are the same as DiEP's; only the scores differ.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from diep_lightning.frozen_moe import FrozenMoEModule
from diep_lightning.methods.base import SEARCH_METHOD, make_scorer


class BaselineModule(FrozenMoEModule):
    """Score experts with a statistics baseline (one epoch, no gradients).

    Args:
        model_name_or_path: local model directory or hub id.
        method: "random", "frequency", "reap" or "naee" (:mod:`diep_lightning.methods`).
        dtype: weights' dtype ("float32", "bfloat16", "float16").
        trust_remote_code: passed to transformers.
        experts_implementation: transformers experts kernel (None: transformers' default).
        random_seed: seed of the "random" baseline.
        naee_keep: experts each layer keeps, for "naee" (its exhaustive search needs the subset size; it must
            match the pruning's sparsity, which the pruning callback checks before the pass).
        naee_max_subsets: NAEE refuses layers with more subsets than this.
        naee_max_tokens: calibration tokens per layer NAEE keeps for its search.
    """

    def __init__(self, model_name_or_path: str, method: Literal["random", "frequency", "reap", "naee"] = "reap",
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32", trust_remote_code: bool = False,
                 experts_implementation: str | None = None, random_seed: int = 0, naee_keep: int | None = None,
                 naee_max_subsets: int = 20_000, naee_max_tokens: int = 2048) -> None:
        if method == SEARCH_METHOD:
            raise ValueError("method: diep is the search itself; use the default model class (DiEPModule), i.e. "
                             "drop --model=BaselineModule")
        scorer = make_scorer(method, seed=random_seed, keep=naee_keep, max_subsets=naee_max_subsets,
                             max_tokens=naee_max_tokens)
        super().__init__(model_name_or_path, dtype, trust_remote_code, experts_implementation)
        self.save_hyperparameters()
        self.scorer = scorer
        self._statistics: Any = None

    @property
    def method_name(self) -> str:  # type: ignore[override]
        return self.hparams.method

    def install_hooks(self) -> None:
        scorer, family = self.scorer, self.family
        self._statistics = family.install_routing_capture(
            self.blocks, lambda block, h, i, w: scorer.observe(family, block, h, i, w))
        self._statistics.enabled = False

    def remove_hooks(self) -> None:
        if self._statistics is not None:
            self._statistics.remove()
            self._statistics = None

    def check_pruning(self, sparsity: float, mode: str) -> None:
        self.scorer.check(self.blocks, sparsity, mode)

    def expert_scores(self) -> list[torch.Tensor]:
        return [s.detach().float().cpu() for s in self.scorer.scores(self.family, self.blocks)]

    @torch.no_grad()
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Route the batch through the frozen model while the scorer watches."""
        self._statistics.enabled = True
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        finally:
            self._statistics.enabled = False

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True  # the statistics need a single pass over the calibration data

    def configure_optimizers(self) -> None:
        return None
