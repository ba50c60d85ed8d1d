"""FSDP2 for the DiEP search: ``ModelParallelStrategy`` with data parallelism only and tiny checkpoints.

Lightning's ``FSDPStrategy`` (FSDP1) is broken with ``manual_backward`` (Lightning #19626/#19685), so the
search scales out with FSDP2: :class:`DiEPModule` calls ``fully_shard`` on every decoder layer in
``configure_model`` and keeps alpha/beta replicated, averaging their gradients itself. This strategy only
changes what Lightning's ``ModelParallelStrategy`` does by default:

- every process is a data-parallel rank (``data_parallel_size = world size``, no tensor parallelism);
- checkpoints hold the trainable state alone (alpha, beta, optimizers, schedulers, loops) in one plain file
  written by rank 0, instead of gathering or sharding the frozen model's weights.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed.constants import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy


class DiEPModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for the DiEP search (FSDP2 data parallel, kilobyte checkpoints).

    Args:
        process_group_backend: "nccl" on GPUs (default there), "gloo" on CPU.
        timeout: collective timeout.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.lightning_module.trainable_state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, path)
        self.barrier("diep_save_checkpoint")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(checkpoint_path, map_location="cpu", weights_only=False)

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=False)
