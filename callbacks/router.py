"""RouterCalibration: after experts are removed, train the surviving routers towards the original model's
next-token distribution (Router KD), so the pruned model routes for the experts it has."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from diep_lightning.callbacks.step import PruningStep
from diep_lightning.pruning import PruningPlan
from diep_lightning.router_calibration import (RouterCalibrationSettings, TeacherTargets, calibrate_routers,
                                               capture_teacher, sample_sequences, start_token)
from diep_lightning.sampling import _allocate, check_weights

#: calibration sources that are not files: the original model's own samples, the search's text
TEXT_KEYWORDS = ("generated", "search")


def check_text(sources: list[str] | str, weights: list[float] | None, num_samples: int | None
               ) -> tuple[list[str], list[float]]:
    """(sources, normalised weights), refused in one line naming the argument before the model loads."""
    from diep_lightning.documents import check_source, normalize_sources

    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 2):
        raise ValueError(f"num_samples: must be an integer >= 2 (one sequence is held out), got {num_samples!r}")
    sources = normalize_sources(sources)
    twice = next((s for i, s in enumerate(sources) if s in sources[:i]), None)
    if twice is not None:
        raise ValueError(f"sources: {twice!r} is listed twice; list each source once and set its share with weights")
    for i, source in enumerate(sources):
        if source not in TEXT_KEYWORDS:  # files that are not there or not text
            check_source(source, i)
    return sources, check_weights(weights, sources)


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
        sources: the calibration text, one or more of: ``"generated"`` (the default: sequences sampled from the
            original model itself before removal, so calibration covers what the model was trained on rather
            than one domain), ``"search"`` (the search's own calibration text), or the datamodule's kinds of
            source (files, folders, ``"bundled"``), drawn with the datamodule's tokenizer, ``seq_len`` and seed.
            What calibration gives back follows the domain of its text (benchmarks/TUNING.md, "Router
            calibration"): give the text the model will serve where you have it.
        weights: share of the sequences from each of ``sources``.
        num_samples: calibration sequences in all (None: the datamodule's ``num_samples``).
    """

    order = 20

    def __init__(self, groups: list[str] | None = None, steps: int = 300, lr: float = 3e-3,
                 temperature: float = 1.0, top_k_logits: int = 256, batch_size: int = 4, holdout: float = 0.125,
                 eval_every: int = 25, patience: int = 3, num_batches: int | None = None, seed: int = 0,
                 sources: list[str] | str = "generated", weights: list[float] | None = None,
                 num_samples: int | None = None) -> None:
        super().__init__()
        self.sources, self.weights = check_text(sources, weights, num_samples)
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

    def batches(self, trainer: pl.Trainer, model: Any = None) -> list[dict[str, Any]]:
        """Every calibration sequence, in a seeded order and on every rank alike (under DDP/FSDP2 a rank's own
        loader holds only its share, and rank 0 calibrates alone). ``model``: the original model, before removal,
        which ``"generated"`` samples from."""
        from diep_lightning.data import first_batches

        datamodule = trainer.datamodule
        if self.sources == ["search"] and not hasattr(datamodule, "calibration_tokens"):
            return first_batches(datamodule, self.num_batches or 10**9)  # a user's loader: its own masks
        search = self.search_tokens(datamodule)
        seq_len = getattr(datamodule, "seq_len", None) or search.shape[1]
        seed = getattr(datamodule, "seed", 0)
        counts = dict(zip(self.sources, _allocate(self.num_samples or search.shape[0], self.weights)))
        parts = []
        if counts.get("generated"):
            start = start_token(model, getattr(datamodule, "tokenizer", None))
            starts = search[torch.arange(counts["generated"]) % search.shape[0], 0] if start is None else start
            parts.append(sample_sequences(model, counts["generated"], seq_len, starts, seed=seed))
        if counts.get("search"):
            parts.append(search[:counts["search"]])
        files = [(s, w) for s, w in zip(self.sources, self.weights) if s not in TEXT_KEYWORDS]
        if files and sum(counts[s] for s, _ in files):
            parts.append(self.own_tokens(datamodule, [s for s, _ in files], [w for _, w in files],
                                         sum(counts[s] for s, _ in files), seq_len))
        tokens = torch.cat(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1:  # the held-out tail draws from every source
            tokens = tokens[torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(seed))]
        return [{"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}]

    def search_tokens(self, datamodule: Any) -> torch.Tensor:
        """The search's calibration sequences (``num_batches`` of the loader's batch size, if set)."""
        from diep_lightning.data import first_batches

        if hasattr(datamodule, "calibration_tokens"):
            tokens = datamodule.calibration_tokens()
        else:
            tokens = torch.cat([b["input_ids"] for b in first_batches(datamodule, self.num_batches or 10**9)])
        return tokens[: self.num_batches * datamodule.batch_size] if self.num_batches is not None else tokens

    def own_tokens(self, datamodule: Any, sources: list[str], weights: list[float], num_samples: int,
                   seq_len: int) -> torch.Tensor:
        """``(num_samples, seq_len)`` sequences from text ``sources``, with the datamodule's tokenizer."""
        from diep_lightning.data import CalibrationDataModule

        if not hasattr(datamodule, "tokenizer"):
            raise ValueError("sources: RouterCalibration draws its own text with the CalibrationDataModule's tokenizer; "
                             "use that datamodule")
        own = CalibrationDataModule(sources=sources, weights=weights, num_samples=num_samples, seq_len=seq_len,
                                    batch_size=datamodule.batch_size, seed=datamodule.seed,
                                    text_field=datamodule.text_field)
        own.set_tokenizer(datamodule.tokenizer)
        return own.calibration_tokens()

    def on_experts_selected(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                            plan: PruningPlan) -> None:
        self.teacher = capture_teacher(model, self.batches(trainer, model), self.settings)

    def on_experts_removed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                           plan: PruningPlan) -> None:
        plan.router_calibration = self.record = self.calibrate(trainer, model)
        self.record["sources"] = list(self.sources)
        self.record["source_weights"] = list(self.weights)
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
