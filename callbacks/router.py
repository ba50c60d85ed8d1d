"""RouterCalibration: after experts are removed, train the surviving routers towards the original model's
next-token distribution (Router KD), so the pruned model routes for the experts it has."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from diep_lightning.callbacks.step import PruningStep
from diep_lightning.pruning import PruningPlan
from diep_lightning.router_calibration import (RouterCalibrationSettings, TeacherTargets, calibrate_routers,
                                               capture_teacher)


class RouterCalibration(PruningStep):
    """Distil the original model into the pruned one through its routers only; experts stay frozen.

    With :class:`GlobalExpertPruning`: the original model's top-k next-token logits are captured on the
    calibration text when the experts are chosen (before merging or removal changes a weight), and once they
    are removed the routers train to minimise KL(original || pruned), with the last ``holdout`` share of the
    sequences kept for early stopping. It runs before :class:`SkipCalibration`, whose thresholds read the
    router, whatever the callbacks' order. ``pruning.json`` records what trained and the held-out KL before and
    after. Override :meth:`calibrate` to change the recovery step.

    Args:
        groups: what trains (default ["router", "norm"]): "router" (router weights and logit biases), "norm" (the
            norm in front of each MoE block), "attention_norm" (the norm in front of the same layer's attention),
            "shared_gate" (a shared expert's gate, Qwen2-MoE).
        steps: most optimiser steps (early stopping may end sooner).
        lr: Adam learning rate.
        temperature: softmax temperature of both distributions.
        top_k_logits: teacher logits kept per token (memory: ``top_k_logits * 8 + 4`` bytes per token).
        batch_size: sequences per step.
        holdout: share of the calibration sequences held out for early stopping.
        eval_every: steps between held-out scores.
        patience: held-out scores without improvement before stopping.
        num_batches: calibration batches taken from the datamodule's train loader (None: all of them).
        seed: order of the training sequences.
        sources: text to calibrate on instead of the search's (the datamodule's ``sources``: files, folders,
            ``"bundled"``), drawn with the datamodule's tokenizer, ``seq_len`` and seed: calibrate on text like the
            text the model will serve; what calibration gives back follows the domain of its text
            (benchmarks/TUNING.md, "Router calibration").
        weights: share of the sequences from each of ``sources``.
        num_samples: sequences drawn from ``sources`` (None: the datamodule's ``num_samples``).
    """

    order = 20

    def __init__(self, groups: list[str] | None = None, steps: int = 300, lr: float = 3e-3,
                 temperature: float = 1.0, top_k_logits: int = 256, batch_size: int = 4, holdout: float = 0.125,
                 eval_every: int = 25, patience: int = 3, num_batches: int | None = None, seed: int = 0,
                 sources: list[str] | str | None = None, weights: list[float] | None = None,
                 num_samples: int | None = None) -> None:
        super().__init__()
        from diep_lightning.sampling import _check_args

        if sources is None and (weights is not None or num_samples is not None):
            raise ValueError(f"{'weights' if weights is not None else 'num_samples'}: applies to the callback's own "
                             "sources; give sources too (or set them on the datamodule)")
        if sources is not None:  # files that are not there or not text: refused before the model loads
            self.sources, self.weights = _check_args(sources, weights, 1 if num_samples is None else num_samples, 1, 0,
                                                     "concat", "text")
        else:
            self.sources = self.weights = None
        self.num_samples = num_samples
        self.settings = RouterCalibrationSettings(
            groups=RouterCalibrationSettings.groups if groups is None else groups, steps=steps, lr=lr,
            temperature=temperature, top_k_logits=top_k_logits, batch_size=batch_size, holdout=holdout,
            eval_every=eval_every, patience=patience, seed=seed).check()
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError(f"num_batches: must be an integer >= 1 or None (all), got {num_batches!r}")
        self.num_batches = num_batches
        self.teacher: TeacherTargets | None = None
        self.record: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse, before the model loads, a run that prunes nothing or a group the model's family lacks."""
        from diep_lightning.callbacks.pruning import GlobalExpertPruning

        if stage != "fit":
            return
        if not any(isinstance(c, GlobalExpertPruning) for c in trainer.callbacks):
            raise ValueError("RouterCalibration: nothing is pruned, so the routers have nothing to recover from; add "
                             "the GlobalExpertPruning callback or drop RouterCalibration")
        family = getattr(pl_module, "family", None)
        if family is not None:
            self.settings.check_family(family)

    def batches(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        """Every calibration sequence (``num_batches`` of the loader's batch size, if set), in sample order and on
        every rank alike: under DDP/FSDP2 a rank's own loader holds only its share, and rank 0 calibrates alone."""
        from diep_lightning.data import first_batches

        datamodule = trainer.datamodule
        if self.sources is not None:
            tokens = self.own_tokens(datamodule)
        elif not hasattr(datamodule, "calibration_tokens"):
            return first_batches(datamodule, self.num_batches or 10**9)
        else:
            tokens = datamodule.calibration_tokens()
        if self.num_batches is not None:
            tokens = tokens[: self.num_batches * datamodule.batch_size]
        return [{"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}]

    def own_tokens(self, datamodule: Any) -> torch.Tensor:
        """``(num_samples, seq_len)`` sequences from the callback's ``sources``, with the datamodule's tokenizer."""
        from diep_lightning.data import CalibrationDataModule

        if not hasattr(datamodule, "tokenizer"):
            raise ValueError("sources: RouterCalibration draws its own text with the CalibrationDataModule's tokenizer; "
                             "use that datamodule")
        own = CalibrationDataModule(sources=self.sources, weights=self.weights,
                                    num_samples=self.num_samples or datamodule.num_samples, seq_len=datamodule.seq_len,
                                    batch_size=datamodule.batch_size, seed=datamodule.seed,
                                    text_field=datamodule.text_field)
        own.set_tokenizer(datamodule.tokenizer)
        return own.calibration_tokens()

    def on_experts_selected(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                            plan: PruningPlan) -> None:
        self.teacher = capture_teacher(model, self.batches(trainer), self.settings)

    def on_experts_removed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                           plan: PruningPlan) -> None:
        plan.router_calibration = self.record = self.calibrate(trainer, model)
        self.record["sources"] = list(self.sources) if self.sources is not None else "the search's calibration text"
        self.teacher = None  # the teacher's logits are not needed any more
        kl = (self.record["heldout_kl_before"], self.record["heldout_kl_after"])
        print(f"[diep_lightning] routers calibrated ({self.record['parameters']:,} parameters, "
              f"{self.record['steps_run']} steps): held-out KL to the original model {kl[0]:.4f} -> {kl[1]:.4f}")

    def calibrate(self, trainer: pl.Trainer, model: Any) -> dict[str, Any]:
        """Train the routers of the pruned ``model`` towards the captured teacher; return the record."""
        if self.teacher is None:
            raise RuntimeError("RouterCalibration: no teacher captured; on_experts_selected must run first")

        def log(metrics: dict[str, float], step: int) -> None:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

        return calibrate_routers(model, self.teacher, self.settings, log=log).to_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"record": self.record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record = state_dict.get("record")
