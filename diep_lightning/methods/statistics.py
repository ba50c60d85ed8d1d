"""BaselineModule: the one no-grad pass over calibration data in which a baseline's scorer watches routing (and,
for the methods that evaluate the model itself, keeps calibration batches).

Chosen on the command line like any LightningCLI subclass: ``--model=BaselineModule --model.method=reap``.
Pruning, merging, skipping and export are the same as DiEP's; only the scores differ.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

from diep_lightning.frozen_moe import FrozenMoEModule
from diep_lightning.methods.base import SEARCH_METHOD, make_scorer


class BaselineModule(FrozenMoEModule):
    """Score experts with a statistics baseline (one epoch, no gradients).

    Args:
        model_name_or_path: local model directory or hub id.
        method: "random", "frequency", "reap", "naee", "evo" (EvoESAP-style allocation), or the references
            "ablation" and "greedy" (:mod:`diep_lightning.methods`).
        dtype: weights' dtype ("float32", "bfloat16", "float16").
        trust_remote_code: passed to transformers.
        experts_implementation: transformers experts kernel (None: transformers' default).
        random_seed: seed of the "random" baseline.
        naee_keep: experts each layer keeps, for "naee" (its exhaustive search needs the subset size; it must
            match the pruning's sparsity, which the pruning callback checks before the pass).
        naee_max_subsets: NAEE refuses layers with more subsets than this.
        naee_max_tokens: calibration tokens per layer NAEE keeps for its search (None: all).
        normalize: "none" or "layer": divide each layer's scores by their mean, so that a ranking across layers
            (``mode: global``) compares like with like (MoNE-style); a per-layer score in global mode without it
            draws a warning.
        reap_weighting: "routing" (llm-compressor) or "softmax" (Cerebras' raw softmax for Mixtral).
        evo_sparsity / evo_criterion / evo_population / evo_generations: the EvoESAP-style search's budget (must
            equal the pruning's sparsity), within-layer ranking, population and generations; the search's seed is
            ``random_seed``.
        evo_scores_from: with ``evo_criterion: recorded``, an export (its ``pruning.json``) whose recorded scores rank
            experts within each layer, e.g. a DiEP export: the search then re-allocates DiEP's ranking.
        greedy_until: the greedy reference removes experts until this fraction is gone.
        greedy_lazy: the accelerated greedy search (re-evaluates only candidates that can still be the cheapest
            removal; exact while removals' costs only grow), for models the exact search is refused on.
        max_evaluations: the references (ablation, greedy) refuse above this many model evaluations.
        reference_tokens: calibration tokens each model evaluation of evo, ablation and greedy runs over.
    """

    def __init__(self, model_name_or_path: str,
                 method: Literal["random", "frequency", "reap", "naee", "evo", "ablation", "greedy"] = "reap",
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32", trust_remote_code: bool = False,
                 experts_implementation: str | None = None, random_seed: int = 0, naee_keep: int | None = None,
                 naee_max_subsets: int = 20_000, naee_max_tokens: int | None = None,
                 normalize: Literal["none", "layer"] = "none", reap_weighting: Literal["routing", "softmax"] = "routing",
                 evo_sparsity: float | None = None, evo_criterion: Literal["reap", "frequency", "recorded"] = "reap",
                 evo_scores_from: str | None = None, evo_population: int = 16, evo_generations: int = 20,
                 greedy_until: float = 0.5, greedy_lazy: bool = False, max_evaluations: int = 5000, reference_tokens: int = 8192) -> None:
        if method == SEARCH_METHOD:
            raise ValueError("method: diep is the search itself; use the default model class (DiEPModule), i.e. "
                             "drop --model=BaselineModule")
        if normalize not in ("none", "layer"):
            raise ValueError(f"normalize: expected 'none' or 'layer', got {normalize!r}")
        scorer = make_scorer(method, seed=random_seed, keep=naee_keep, max_subsets=naee_max_subsets,
                             max_tokens=naee_max_tokens, weighting=reap_weighting, sparsity=evo_sparsity,
                             criterion=evo_criterion, scores_from=evo_scores_from, population=evo_population,
                             generations=evo_generations, until=greedy_until, lazy=greedy_lazy,
                             max_evaluations=max_evaluations, reference_tokens=reference_tokens)
        super().__init__(model_name_or_path, dtype, trust_remote_code, experts_implementation)
        self.save_hyperparameters()
        self.scorer = scorer
        self._statistics: Any = None

    @property
    def method_name(self) -> str:  # type: ignore[override]
        return self.hparams.method

    def install_hooks(self) -> None:
        scorer, family = self.scorer, self.family
        scorer.setup(self.model, family, self.blocks)
        self._statistics = family.install_routing_capture(
            self.blocks, lambda block, h, i, w: scorer.observe(family, block, h, i, w))
        self._statistics.enabled = False

    def remove_hooks(self) -> None:
        if self._statistics is not None:
            self._statistics.remove()
            self._statistics = None

    def check_pruning(self, sparsity: float, mode: str) -> None:
        self.scorer.check(self.blocks, sparsity, mode)
        if mode == "global" and self.scorer.per_layer_scale and self.hparams.normalize == "none":
            warnings.warn(f"{self.hparams.method} scores are per layer and their scale differs between layers; "
                          "ranking them globally favours some layers by scale alone; add --model.normalize=layer "
                          "(MoNE-style) or prune with mode uniform", stacklevel=2)

    def expert_scores(self) -> list[torch.Tensor]:
        scores = [s.detach().float().cpu() for s in self.scorer.scores(self.family, self.blocks)]
        if self.hparams.normalize == "layer":
            scores = [s / s.mean() if float(s.mean()) > 0 else s for s in scores]
        return scores

    @torch.no_grad()
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Route the batch through the frozen model while the scorer watches."""
        if self.scorer.wants_batches:
            self.scorer.observe_batch(batch)
        self._statistics.enabled = True
        try:
            self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        finally:
            self._statistics.enabled = False

    def on_train_epoch_end(self) -> None:
        self.trainer.should_stop = True  # the statistics need a single pass over the calibration data

    def configure_optimizers(self) -> None:
        return None
