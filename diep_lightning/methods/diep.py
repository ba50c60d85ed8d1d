"""``diep``: the DiEP search as a LightningModule: learn per-expert logits a^(l) and per-layer scalars b^(l) on a
frozen MoE.

See ``docs/method.md``: the student is the frozen model with each chosen expert's routing weight multiplied by
``beta^(l) * s(alpha_i^(l))``; the teacher is the very same weights with that scaling switched off, run
under ``no_grad`` (no second copy of the model). Loss = CE(student) + lambda * reconstruction, optimised by
alternating blocks of alpha steps and beta steps (paper: 3:1), each with its own optimizer and schedule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from diep_lightning.frozen_moe import FrozenMoEModule


def parse_ratio(ratio: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Parse an alpha:beta step ratio such as ``"3:1"``.

    Raises:
        ValueError: one line naming ``alpha_beta_ratio`` and the expected form.
    """
    try:
        if isinstance(ratio, str):
            parts = [int(p) for p in ratio.split(":")]
        else:
            parts = [int(p) for p in ratio]
        if len(parts) != 2 or min(parts) < 0 or sum(parts) == 0:
            raise ValueError
    except (ValueError, TypeError):
        raise ValueError(
            f"alpha_beta_ratio: expected 'A:B' with non-negative integers not both 0 (e.g. '3:1'), got {ratio!r}"
        ) from None
    return parts[0], parts[1]


def _default_alpha_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 2e-2 (the paper: 5e-3): in the paper's 60 alpha steps, 5e-3 moves the logits by at most 0.3,
    too little to order the experts of a layer; 2e-2 measured best (benchmarks/TUNING.md)."""
    return torch.optim.Adam(params, lr=2e-2)


def _default_beta_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Plain gradient steps (the paper's eq. 9) at lr 1.0. Adam would move every layer's beta by the same amount
    per step (its update is about lr x sign(gradient)), erasing the between-layer differences that decide how many
    experts each layer keeps; SGD keeps their size (benchmarks/TUNING.md)."""
    return torch.optim.SGD(params, lr=1.0)


class DiEPModule(FrozenMoEModule):
    """Differentiable Expert Pruning search on a frozen MoE model (the default ``model`` of the CLI).

    Args:
        model_name_or_path: local model directory or hub id.
        dtype: weights' dtype ("float32", "bfloat16", "float16").
        lam: weight lambda of the reconstruction term (paper: 0.01).
        reconstruction: which outputs are matched: every MoE block's output ("blocks", default) or the final
            hidden state ("final_hidden").
        reconstruction_reduction: "mean" (default): squared L2 error per token averaged over tokens, summed
            over layers; "sum": squared Frobenius norm summed over tokens and layers (the literal eq. 6).
        alpha_beta_ratio: consecutive alpha steps : beta steps, e.g. "3:1".
        alpha_scaling: "softmax" (default): the paper's literal alpha, so every expert starts at 1/N of its
            weight and the search learns which experts to restore; "n_softmax": s(alpha) = N * softmax(a), so the
            relaxed model equals the original at initialisation (measured far worse: at the original model the
            gradients carry little information about importance; benchmarks/TUNING.md).
        alpha_optimizer: optimizer factory for the alpha logits (default Adam, lr 2e-2; the paper: 5e-3).
        beta_optimizer: optimizer factory for the per-layer betas (default SGD, lr 1.0: plain gradient steps
            keep the between-layer differences that Adam's per-parameter normalisation erases).
        alpha_scheduler / beta_scheduler: scheduler factories; default: cosine annealing over each
            optimizer's own number of steps.
        gradient_clip_val: max gradient norm of each step's parameters (None: no clipping). Clipping is done
            by hand because manual optimization ignores the Trainer's clipping.
        trust_remote_code: passed to transformers.
        experts_implementation: transformers experts kernel ("eager", "batched_mm", "grouped_mm"; None:
            transformers' default).
        teacher_cache_gb: keep the teacher's outputs per calibration sample after their first computation, so
            later epochs skip the teacher pass (the teacher is fixed: frozen weights, fixed samples), when the
            cache fits in this many GiB; 0 disables it. The values are the same as recomputing them. Under
            DDP/FSDP each rank caches only its own share of the samples, so the limit is per rank.
        teacher_cache_device: where the cache lives: "model" (the model's device, default) or "cpu" (host
            memory, copied to the model's device per step): at real sizes the cache is tens of GB, more than an
            accelerator spares but what a GPU server's host memory holds, and without it every step reruns the
            teacher (a third more compute).
    """

    method_name = "DiEP"

    def __init__(
        self,
        model_name_or_path: str,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lam: float = 0.01,
        reconstruction: Literal["blocks", "final_hidden"] = "blocks",
        reconstruction_reduction: Literal["mean", "sum"] = "mean",
        alpha_beta_ratio: str = "3:1",
        alpha_scaling: Literal["n_softmax", "softmax"] = "softmax",
        alpha_optimizer: OptimizerCallable = _default_alpha_optimizer,
        beta_optimizer: OptimizerCallable = _default_beta_optimizer,
        alpha_scheduler: LRSchedulerCallable | None = None,
        beta_scheduler: LRSchedulerCallable | None = None,
        gradient_clip_val: float | None = 1.0,
        trust_remote_code: bool = False,
        experts_implementation: str | None = None,
        teacher_cache_gb: float = 2.0,
        teacher_cache_device: Literal["model", "cpu"] = "model",
    ) -> None:
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam: the reconstruction weight must be a finite number >= 0, got {lam!r}")
        if reconstruction not in ("blocks", "final_hidden"):
            raise ValueError(f"reconstruction: expected 'blocks' or 'final_hidden', got {reconstruction!r}")
        if reconstruction_reduction not in ("mean", "sum"):
            raise ValueError(f"reconstruction_reduction: expected 'mean' or 'sum', got {reconstruction_reduction!r}")
        if alpha_scaling not in ("n_softmax", "softmax"):
            raise ValueError(f"alpha_scaling: expected 'n_softmax' or 'softmax', got {alpha_scaling!r}")
        if teacher_cache_device not in ("model", "cpu"):
            raise ValueError(f"teacher_cache_device: expected 'model' or 'cpu', got {teacher_cache_device!r}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val: must be > 0 or null, got {gradient_clip_val!r}")
        ratio = parse_ratio(alpha_beta_ratio)
        for name, factory in (("alpha_optimizer", alpha_optimizer), ("beta_optimizer", beta_optimizer)):
            _probe_optimizer(name, factory)
        super().__init__(model_name_or_path, dtype, trust_remote_code, experts_implementation)
        self.ratio = ratio
        self.save_hyperparameters(ignore=["alpha_optimizer", "beta_optimizer", "alpha_scheduler", "beta_scheduler"])
        self.alpha_optimizer, self.beta_optimizer = alpha_optimizer, beta_optimizer
        self.alpha_scheduler, self.beta_scheduler = alpha_scheduler, beta_scheduler
        self.alpha_logits = nn.ParameterList()
        self.beta = nn.ParameterList()
        self._scaling = None
        self._capture_handles: list[Any] = []
        self._captured: dict[int, torch.Tensor] = {}
        self._teacher_cache: dict[int, dict[int, torch.Tensor]] = {}

    # ------------------------------------------------------------------ hooks on the frozen model
    def install_hooks(self) -> None:
        """Create alpha/beta (unless a checkpoint restored them) and install the scaling and capture hooks."""
        if not len(self.alpha_logits):
            for block in self.blocks:
                self.alpha_logits.append(nn.Parameter(torch.zeros(block.num_experts)))
                self.beta.append(nn.Parameter(torch.ones(())))
        self._scaling = self.family.install_scaling(self.blocks, self.expert_scale)
        self._capture_handles = [block.module.register_forward_hook(self._capture_hook(block.index))
                                 for block in self.blocks]

    def remove_hooks(self) -> None:
        if self._scaling is not None:
            self._scaling.remove()
            self._scaling = None
        for handle in self._capture_handles:
            handle.remove()
        self._capture_handles = []

    def unscaled(self) -> Any:
        """Context in which the model computes as the original (the search's scaling switched off)."""
        return self._scaling.disabled() if self._scaling is not None else super().unscaled()

    def _capture_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._capturing:
                self._captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    _capturing = False

    # ------------------------------------------------------------------ the search space
    def alphas(self) -> list[torch.Tensor]:
        """alpha^(l) = softmax(a^(l)) for each MoE block."""
        return [torch.softmax(a, dim=0) for a in self.alpha_logits]

    def expert_scale(self, index: int) -> torch.Tensor:
        """Per-expert multiplier of block ``index``'s routing weights: beta * s(alpha)."""
        alpha = torch.softmax(self.alpha_logits[index], dim=0)
        if self.hparams.alpha_scaling == "n_softmax":
            alpha = alpha * alpha.numel()
        return self.beta[index] * alpha

    def expert_scores(self) -> list[torch.Tensor]:
        """Pruning scores alpha_i^(l) * beta^(l) (eq. 10), on CPU."""
        return [(torch.softmax(a.detach(), 0) * b.detach()).float().cpu() for a, b in zip(self.alpha_logits, self.beta)]

    # ------------------------------------------------------------------ forward passes
    def _run(self, batch: dict[str, torch.Tensor], with_labels: bool) -> tuple[Any, dict[int, torch.Tensor]]:
        self._captured = {}
        self._capturing = self.hparams.reconstruction == "blocks"
        try:
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                labels=batch["input_ids"] if with_labels else None,
                output_hidden_states=self.hparams.reconstruction == "final_hidden",
                use_cache=False,
            )
        finally:
            self._capturing = False
        captured = self._captured
        if self.hparams.reconstruction == "final_hidden":
            captured = {0: out.hidden_states[-1]}
        return out, captured

    def _cache_fits(self, batch: dict[str, torch.Tensor], teacher: dict[int, torch.Tensor]) -> bool:
        if self.hparams.teacher_cache_gb <= 0 or "sample_index" not in batch or self._trainer is None:
            return False
        per_sample = sum(t[0].numel() * t.element_size() for t in teacher.values())
        loader = self.trainer.train_dataloader
        # the samples this rank sees (its sampler's share under DDP/FSDP, else the whole set)
        source = getattr(loader, "sampler", None) or getattr(loader, "dataset", None)
        samples = len(source) if source is not None and hasattr(source, "__len__") else 0
        return per_sample * samples <= self.hparams.teacher_cache_gb * 2**30

    def setup(self, stage: str) -> None:
        # Lightning warns whenever a module's own transfer hook meets a datamodule; ours is meant to serve (below)
        warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device` in `LightningModule`")
        super().setup(stage)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Everything but the sample ids goes to the device: the ids only index the teacher cache on the host, and
        reading them back from an accelerator would wait for it every step."""
        if isinstance(batch, dict) and "sample_index" in batch:
            rest = {k: v for k, v in batch.items() if k != "sample_index"}
            return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "sample_index": batch["sample_index"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The unscaled model's matched outputs for the batch, from the per-sample cache when it has them."""
        index = batch.get("sample_index")
        ids = index.tolist() if index is not None else None  # one read of the ids (host-side: no device wait)
        if ids is not None and self._teacher_cache and all(i in self._teacher_cache for i in ids):
            rows = [self._teacher_cache[i] for i in ids]
            return {key: self._to_device(torch.stack([row[key] for row in rows])) for key in rows[0]}
        with torch.no_grad(), self._scaling.disabled():
            _, teacher = self._run(batch, with_labels=False)
        teacher = {k: v.detach() for k, v in teacher.items()}
        if ids is not None and self._cache_fits(batch, teacher):
            host = self.hparams.teacher_cache_device == "cpu"
            for row, i in enumerate(ids):
                self._teacher_cache[i] = {k: v[row].to("cpu", copy=True) if host else v[row].clone()
                                          for k, v in teacher.items()}
        return teacher

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a host-cached tensor to the model's GPU without waiting: a copy from pageable memory would first
        wait for every queued kernel, so it goes through pinned memory."""
        if tensor.device.type == "cpu" and self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CE of the student, reconstruction against the teacher, and their weighted sum."""
        teacher = self.teacher_outputs(batch)
        student_out, student = self._run(batch, with_labels=True)
        mask = batch.get("attention_mask")
        recon = student_out.loss.new_zeros(())
        for key, y_s in student.items():
            diff = (y_s.float() - teacher[key].float()).pow(2).sum(-1)  # (B, T)
            if mask is not None:
                diff = diff * mask
            if self.hparams.reconstruction_reduction == "mean":
                denom = mask.sum() if mask is not None else diff.numel()
                recon = recon + diff.sum() / denom
            else:
                recon = recon + diff.sum()
        ce = student_out.loss
        return {"ce": ce, "reconstruction": recon, "loss": ce + self.hparams.lam * recon}

    # ------------------------------------------------------------------ optimisation
    def current_phase(self) -> str:
        """"alpha" or "beta": which block of the alternating schedule the next step belongs to.

        Derived from ``global_step`` (one optimizer step per batch), so a resumed run continues the cycle."""
        n_alpha, n_beta = self.ratio
        return "alpha" if self.global_step % (n_alpha + n_beta) < n_alpha else "beta"

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        opt_alpha, opt_beta = self.optimizers()
        sched_alpha, sched_beta = self.lr_schedulers()
        phase = self.current_phase()
        losses = self.compute_losses(batch)
        if not torch.isfinite(losses["loss"]):
            saved = self._save_last_good()
            raise FloatingPointError(
                f"loss: non-finite loss ({losses['loss'].item()}) at step {self.global_step} "
                f"(ce {losses['ce'].item()}, reconstruction {losses['reconstruction'].item()}); the search stopped "
                f"and the last good alpha/beta are in {saved}; lower the learning rates or lambda"
            )
        opt_alpha.zero_grad(set_to_none=True)
        opt_beta.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        self._sync_replicated_grads()
        params = list(self.alpha_logits) if phase == "alpha" else list(self.beta)
        if self.hparams.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(params, self.hparams.gradient_clip_val)
        if phase == "alpha":
            opt_alpha.step()
            sched_alpha.step()
        else:
            opt_beta.step()
            sched_beta.step()
        self._log_step(losses, phase, opt_alpha, opt_beta)
        return losses["loss"]

    def _save_last_good(self) -> str:
        """Write the current (last finite) alpha/beta next to the logs; return the path."""
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        path = root / "last_good_scores.pt"
        if self.trainer.is_global_zero:
            torch.save({"step": self.global_step, "state_dict": self.trainable_state_dict(),
                        "scores": self.expert_scores()}, path)
        return str(path)

    def _sync_replicated_grads(self) -> None:
        """Average alpha/beta gradients across ranks under FSDP2 (DDP does this itself)."""
        if getattr(self, "device_mesh", None) is None or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        for p in [*self.alpha_logits, *self.beta]:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad.div_(world)

    def _log_step(self, losses: dict[str, torch.Tensor], phase: str, opt_alpha: Any, opt_beta: Any) -> None:
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=True, on_step=True,
                      on_epoch=True, sync_dist=False)
        if not self.logs_layers_now():
            return
        metrics: dict[str, float] = {
            "train/phase_alpha": float(phase == "alpha"),
            "lr/alpha": opt_alpha.param_groups[0]["lr"],
            "lr/beta": opt_beta.param_groups[0]["lr"],
        }
        # one host transfer for all layers, not two per layer
        alphas = [a.detach().float() for a in self.alphas()]
        entropy = torch.stack([-(a * a.clamp_min(1e-12).log()).sum() for a in alphas])
        betas = torch.stack([b.detach().float().reshape(()) for b in self.beta])
        for i, (beta, ent) in enumerate(zip(*torch.stack([betas, entropy]).cpu().tolist())):
            metrics[f"beta/layer_{i}"] = beta
            metrics[f"alpha_entropy/layer_{i}"] = ent
        self.log_dict(metrics, on_step=True, on_epoch=False)

    def logs_layers_now(self) -> bool:
        """Whether this step's per-layer beta and alpha entropy reach a logger: only on the trainer's logging steps
        (``log_every_n_steps``), so that a search without a logger pays nothing for them."""
        if self._trainer is None or not self.trainer.loggers:
            return False
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0 or self.trainer.should_stop

    def configure_optimizers(self) -> Any:
        opt_alpha = self.alpha_optimizer(list(self.alpha_logits))
        opt_beta = self.beta_optimizer(list(self.beta))
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        n_alpha, n_beta = self.ratio
        steps_alpha = max(1, math.ceil(total * n_alpha / (n_alpha + n_beta)))
        steps_beta = max(1, math.ceil(total * n_beta / (n_alpha + n_beta)))
        sched_alpha = (self.alpha_scheduler(opt_alpha) if self.alpha_scheduler is not None
                       else torch.optim.lr_scheduler.CosineAnnealingLR(opt_alpha, T_max=steps_alpha))
        sched_beta = (self.beta_scheduler(opt_beta) if self.beta_scheduler is not None
                      else torch.optim.lr_scheduler.CosineAnnealingLR(opt_beta, T_max=steps_beta))
        return [opt_alpha, opt_beta], [sched_alpha, sched_beta]

    # ------------------------------------------------------------------ checkpoints: alpha and beta only
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """alpha logits and beta, the only weights a checkpoint needs (kilobytes, not the model)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                if k.startswith(("alpha_logits.", "beta."))}


def _probe_optimizer(name: str, factory: Any) -> None:
    """Build the optimizer on a dummy parameter now, so a bad learning rate fails before the model loads."""
    try:
        factory([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name}: {str(err).strip().splitlines()[0]}") from None
