"""Helpers shared by the tests that drive the real CLI (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from diep_lightning.families import get_family
from diep_lightning.pruning import select_experts


def fit_args(model_dir: str, root: str, *extra: str, epochs: int = 2) -> list[str]:
    """Arguments of a fast ``fit`` on a tiny model (16 sequences of 32 tokens, batch 4)."""
    return [
        "fit",
        f"--model.model_name_or_path={model_dir}",
        "--data.num_samples=16",
        "--data.seq_len=32",
        "--data.batch_size=4",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def non_uniform_scores(model):
    """Scores that make global pruning non-uniform (the second layer scores higher)."""
    family = get_family(model)
    if model.config.model_type == "deepseek_v3":  # keep router groups even (2 groups of 4) so routing is exact
        return [torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]), torch.tensor([0.5, 2, 2, 2, 0.5, 2, 2, 2])]
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(b.num_experts, generator=gen) + 0.5 * b.index for b in family.blocks(model)]


def plan_for(model, sparsity, mode="global"):
    """The plan that :func:`non_uniform_scores` gives ``model`` at ``sparsity``."""
    blocks = get_family(model).blocks(model)
    return select_experts(non_uniform_scores(model), sparsity, [b.top_k for b in blocks], mode)


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits



class WaitForFile(pl.Callback):
    """Holds a run at the start of epoch ``epoch`` until ``path`` exists (``--trainer.callbacks+=helpers.WaitForFile``),
    so a test can act while the run is mid-search whatever the machine's speed."""

    def __init__(self, path: str, epoch: int = 0, timeout: float = 300.0) -> None:
        self.path, self.epoch, self.timeout = Path(path), epoch, timeout

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        deadline = time.time() + self.timeout
        while not self.path.exists() and time.time() < deadline:
            time.sleep(0.1)
