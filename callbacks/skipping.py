"""SkipCalibration: calibrate DiEP's adaptive expert skipping and install it in the model (after pruning)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from diep_lightning.callbacks.step import PruningStep
from diep_lightning.data import first_batches
from diep_lightning.pruning import PruningPlan, SkipRecord
from diep_lightning.skipping import calibrate_skipping


class SkipCalibration(PruningStep):
    """Calibrate per-layer skipping thresholds on calibration tokens and install skipping in the model.

    With :class:`GlobalExpertPruning` it runs on the survivors once experts are removed, and the gammas go
    into the export's ``pruning.json`` (``load_pruned`` re-installs skipping). Without a pruning callback it
    calibrates and installs skipping on the unpruned model at fit end (``pl_module.skipping_model``).

    Args:
        renormalize: rescale the surviving routing weights to their original sum when a slot is skipped.
        max_tokens: calibration tokens per layer.
        num_batches: calibration batches taken from the datamodule.
        strength: multiplies every threshold; 1 is the paper's median rule, above 1 skips more (faster decoding
            at some quality: benchmarks/RESULTS.md measures the trade-off).
        share: instead of ``strength``, the share of chosen expert slots to skip on the calibration tokens (the
            strength that reaches it is found and recorded).
    """

    order = 30

    def __init__(self, renormalize: bool = False, max_tokens: int = 4096, num_batches: int = 4,
                 strength: float = 1.0, share: float | None = None) -> None:
        super().__init__()
        if max_tokens <= 0 or num_batches <= 0:
            raise ValueError(f"max_tokens/num_batches: must be > 0, got {max_tokens!r}/{num_batches!r}")
        if not isinstance(strength, (int, float)) or not strength > 0:
            raise ValueError(f"strength: must be a number > 0, got {strength!r}")
        if share is not None and not (isinstance(share, (int, float)) and 0 < share < 1):
            raise ValueError(f"share: must be a number in (0, 1), got {share!r}")
        self.strength, self.share = float(strength), share
        self.renormalize = bool(renormalize)
        self.max_tokens, self.num_batches = int(max_tokens), int(num_batches)
        self.gammas: dict[int, list[list[float]]] = {}
        self.skipped_fraction: dict[int, float] = {}
        self.hooks: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a top-1 model from its config, before the model loads."""
        config, family = getattr(pl_module, "hf_config", None), getattr(pl_module, "family", None)
        if config is not None and family is not None:
            _, k = family.config_experts(config)
            if k is not None and k < 2:
                raise ValueError(f"SkipCalibration: skipping needs top-k >= 2 routing, the model routes top-{k}; "
                                 "drop the SkipCalibration callback for this model")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        low = [b.index for b in pl_module.blocks if b.top_k < 2]
        if low:
            raise ValueError(f"SkipCalibration: skipping needs top-k >= 2 routing, MoE layers {low} route top-1; "
                             "drop the SkipCalibration callback for this model")

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any) -> SkipRecord:
        """Compute and install the thresholds on ``model`` (:func:`diep_lightning.skipping.calibrate_skipping`);
        return the record that goes into the plan and ``pruning.json``."""
        batches = first_batches(trainer.datamodule, self.num_batches)
        skipping = calibrate_skipping(model, batches, self.max_tokens, self.renormalize, self.strength, self.share)
        self.hooks = skipping.hooks
        self.gammas = {i: g.tolist() for i, g in skipping.gammas.items()}
        self.skipped_fraction = skipping.skipped_fraction
        metrics = {f"skip/fraction/layer_{i}": f for i, f in self.skipped_fraction.items()}
        if self.skipped_fraction:
            metrics["skip/fraction/mean"] = sum(self.skipped_fraction.values()) / len(self.skipped_fraction)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        shown = ", ".join(f"{f:.3f}" for f in self.skipped_fraction.values())
        print(f"[diep_lightning] skipping calibrated; fraction of expert calls skipped per layer: {shown}")
        return skipping.record()

    def on_experts_removed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                           plan: PruningPlan) -> None:
        plan.skipping = self.calibrate(trainer, pl_module, model)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from diep_lightning.callbacks.pruning import GlobalExpertPruning

        if trainer.interrupted or any(isinstance(c, GlobalExpertPruning) for c in trainer.callbacks):
            return
        if getattr(pl_module, "device_mesh", None) is None and not trainer.is_global_zero:
            return
        model = pl_module.release_model()
        if model is not None:
            with torch.no_grad():
                self.calibrate(trainer, pl_module, model)
            pl_module.skipping_model = model

    def state_dict(self) -> dict[str, Any]:
        return {"gammas": {str(k): v for k, v in self.gammas.items()}, "skipped_fraction": self.skipped_fraction}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.gammas = {int(k): v for k, v in state_dict.get("gammas", {}).items()}
        self.skipped_fraction = state_dict.get("skipped_fraction", {})
