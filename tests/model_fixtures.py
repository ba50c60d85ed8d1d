"""Fixtures shared by the search, export and CLI tests: tiny random models saved with a tokenizer.

Import the fixtures you need into a test module (``from model_fixtures import tiny_mixtral_dir``).
"""

from __future__ import annotations

import pytest

from diep_lightning.testing import save_tiny_model


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Mixtral (8 experts, top-2, 2 layers) saved with the tiny tokenizer."""
    return save_tiny_model("mixtral", str(tmp_path_factory.mktemp("tiny_mixtral")), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Qwen2-MoE (8 experts, top-2, shared expert) saved with the tiny tokenizer."""
    return save_tiny_model("qwen2_moe", str(tmp_path_factory.mktemp("tiny_qwen")), tiny_tokenizer)


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
