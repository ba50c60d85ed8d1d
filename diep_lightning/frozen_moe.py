"""FrozenMoEModule: a frozen MoE model under a Lightning loop, the base of every method's LightningModule.

It owns what every method shares: reading the source model (with the run's dtype and ``trust_remote_code``,
checked before any weight loads), finding its MoE blocks, FSDP2 sharding, handing the model over for pruning,
and tying checkpoints to the model they were made for. A method subclass adds its hooks
(:meth:`install_hooks`), its steps and :meth:`expert_scores`; the pruning callback needs nothing else.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from diep_lightning.families import MoEBlock, get_family
from diep_lightning.loading import DTYPES, fingerprint, load_config, load_model, load_tokenizer, resolve_model_path


class FrozenMoEModule(LightningModule):
    """A frozen MoE whose experts a method scores.

    Args:
        model_name_or_path: local model directory or hub id.
        dtype: weights' dtype ("float32", "bfloat16", "float16").
        trust_remote_code: passed to transformers.
        experts_implementation: transformers experts kernel ("eager", "batched_mm", "grouped_mm"; None:
            transformers' default).
    """

    #: the name recorded in the model card and ``pruning.json``
    method_name = ""

    def __init__(self, model_name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 experts_implementation: str | None = None) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype_name, self.trust_remote_code = dtype, bool(trust_remote_code)
        self.experts_implementation = experts_implementation
        self.model_path = resolve_model_path(model_name_or_path)
        self.hf_config = load_config(self.model_path, trust_remote_code)
        self.family = get_family(self.hf_config)  # unknown / dense model types fail here, before any weight
        self.family.check_config(self.hf_config)
        self.model_fingerprint = fingerprint(self.model_path)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only a method's own state, never the frozen model
        self.model: nn.Module | None = None
        self.blocks: list[MoEBlock] = []

    # ------------------------------------------------------------------ the model
    def configure_model(self) -> None:
        """Load the frozen model once (idempotent), let the method install its hooks, and shard decoder layers
        with FSDP2 under ``ModelParallelStrategy``."""
        if self.model is not None:
            return
        model = self.load_source_model(experts_implementation=self.experts_implementation)
        model.requires_grad_(False)
        model.eval()  # PhiMoE routes randomly and Mixtral adds jitter in train mode
        self.model = model
        self.blocks = self.family.blocks(model)
        if not self.blocks:
            raise ValueError(f"model_name_or_path: {self.model_path!r} has no sparse MoE layer to prune")
        self.family.check_model(model)
        self.install_hooks()
        self._maybe_shard()

    def install_hooks(self) -> None:
        """Add the method's parameters and hooks to the loaded model (``self.model``, ``self.blocks``)."""

    def remove_hooks(self) -> None:
        """Undo :meth:`install_hooks`, leaving the plain model."""

    def unscaled(self) -> Any:
        """Context in which the model computes as the original (a method that changes the forward undoes it)."""
        return contextlib.nullcontext()

    def on_train_epoch_start(self) -> None:
        # Lightning may switch submodules to train mode; the frozen model must route deterministically.
        self.model.eval()

    def release_model(self) -> nn.Module | None:
        """The frozen model without the method's hooks, ready to be pruned.

        Single process, unsharded: this very model (no second copy in memory); the module cannot run any more
        afterwards. Sharded (FSDP2): a fresh full copy loaded on global rank 0 (None on other ranks), so pruning
        never needs gathered shards.
        """
        if self.model is None:
            raise RuntimeError("release_model: no model loaded; call it after fit")
        if getattr(self, "device_mesh", None) is not None:
            return self.load_source_model() if self.trainer.is_global_zero else None
        self.remove_hooks()
        return self.model

    def load_source_model(self, **kwargs: Any) -> nn.Module:
        """A fresh copy of the source model with the run's dtype and ``trust_remote_code`` (checked: readable,
        matching its config, finite), in eval mode."""
        return load_model(self.model_path, dtype=self.dtype_name, trust_remote_code=self.trust_remote_code, **kwargs)

    def load_tokenizer(self) -> Any:
        """The tokenizer stored with the source model (None if it has none)."""
        return load_tokenizer(self.model_path, trust_remote_code=self.trust_remote_code)

    def setup(self, stage: str) -> None:
        """Checks that need the datamodule, before the model loads."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(datamodule, "seq_len", None)
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        if isinstance(seq_len, int) and isinstance(limit, int) and seq_len > limit:
            raise ValueError(f"seq_len: {seq_len} tokens per sequence exceed the model's max_position_embeddings "
                             f"({limit}); use data.seq_len <= {limit}")

    def _maybe_shard(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"]
        for layer in self.family.decoder_layers(self.model):
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    # ------------------------------------------------------------------ what the pruning callback asks
    def check_pruning(self, sparsity: float, mode: str) -> None:
        """Fail before the search on a pruning setting the method cannot serve (default: every one is fine)."""

    def expert_scores(self) -> list[torch.Tensor]:
        """One (N_l,) score tensor per MoE block, on CPU; higher = keep."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints: the method's state only
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own tensors (the frozen model is never checkpointed)."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["diep"] = {"model_name_or_path": self.model_path, "model_type": self.hf_config.model_type,
                              "experts_per_block": [b.num_experts for b in self.blocks],
                              "fingerprint": self.model_fingerprint}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get("diep", {})
        check_same_model(recorded, self.model_path, self.model_fingerprint)
        saved = recorded.get("experts_per_block")
        if saved is not None and self.blocks and saved != [b.num_experts for b in self.blocks]:
            raise ValueError(
                f"ckpt_path: checkpoint was made for experts per block {saved}, this model has "
                f"{[b.num_experts for b in self.blocks]}; resume with the same model_name_or_path"
            )


def check_same_model(recorded: dict[str, Any], model_path: str, model_fingerprint: str | None) -> None:
    """Refuse to resume on another model than the one a checkpoint was made for."""
    saved_path, saved_print = recorded.get("model_name_or_path"), recorded.get("fingerprint")
    if saved_print and model_fingerprint and saved_print != model_fingerprint:
        same = saved_path is not None and Path(saved_path).resolve() == Path(model_path).resolve()
        what = "its files changed since" if same else f"it was made for {saved_path!r}"
        raise ValueError(f"ckpt_path: the checkpoint does not match the model {model_path!r} ({what}; fingerprint "
                         f"{saved_print} != {model_fingerprint}); resume with the model it was made for, or start "
                         "without ckpt_path")
