"""Calibration data under Lightning: the sampled calibration sequences (:mod:`diep_lightning.sampling`) as a
``LightningDataModule``, with a sampler that keeps each rank on the same share every epoch."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from diep_lightning.loading import load_tokenizer
from diep_lightning.sampling import (BUNDLED_C4_PATH, _check_args, load_calibration_tokens,
                                     sample_calibration_splits)

__all__ = [
    "BUNDLED_C4_PATH",
    "CalibrationDataModule",
    "TokenBlockDataset",
    "first_batches",
    "load_calibration_tokens",
    "sample_calibration_splits",
]

# --------------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------------
class TokenBlockDataset(Dataset):
    """Map-style dataset over a ``(N, T)`` token tensor yielding ``input_ids`` / ``attention_mask`` dicts, plus
    ``sample_index`` (the row), which lets the search cache the teacher's outputs per sample."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[idx]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "sample_index": torch.tensor(idx)}


class RankShardSampler(DistributedSampler):
    """A ``DistributedSampler`` whose rank keeps the same samples every epoch (rows ``rank, rank + replicas, ...``),
    shuffled within the shard per epoch; with one replica its order equals ``DistributedSampler``'s.

    Why: the search caches the teacher's outputs per sample, and a rank that saw other samples each epoch would
    have to cache all of them instead of its own share."""

    def __iter__(self) -> Any:
        shard = list(range(self.rank, len(self.dataset), self.num_replicas))
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            shard = [shard[i] for i in torch.randperm(len(shard), generator=g).tolist()]
        if self.drop_last:
            return iter(shard[:self.num_samples])
        return iter((shard * (self.num_samples // max(1, len(shard)) + 1))[:self.num_samples])


class CalibrationDataModule(L.LightningDataModule):
    """Fixed-length calibration sequences (default: the bundled C4 train sample).

    Batches are dicts with ``input_ids`` and ``attention_mask``, both ``(batch_size, seq_len)``
    int64 (the mask is all ones: there is no padding). See the module docstring for sources and the
    sampling scheme.

    Args:
        tokenizer: Tokenizer path or hub name (loaded with ``AutoTokenizer``). May be left ``None`` if the
            LightningModule injects a tokenizer object with :meth:`set_tokenizer` before ``setup``.
        sources: ``"bundled"`` (shipped C4 sample), ``"c4"`` (stream ``allenai/c4`` ``en`` train; online
            only), a ``.jsonl`` file, a ``.txt`` file, a directory of those, or a list mixing them.
        weights: Fraction of the sequences drawn from each source (same length as ``sources``;
            normalised; default equal).
        num_samples: Number of training (calibration) sequences; the DiEP paper uses 128.
        seq_len: Tokens per sequence. The paper uses 2048 with C4; the default 256 matches the context
            length of the shipped tiny models and fits the bundled sample (about 150k tokens).
        batch_size: Sequences per batch.
        seed: Random seed; the samples (and the shuffling of the train loader) depend only on it.
        num_workers: DataLoader worker processes.
        val_samples: Held-out sequences drawn from the same sources, disjoint from the training ones
            (with ``sampling="concat"``); 0 disables the validation loader.
        text_field: JSON field holding the text in ``.jsonl`` sources.
        sampling: ``"concat"`` (disjoint random windows of the concatenated documents) or
            ``"document"`` (GPTQ-style: random window of a random document with >= ``seq_len`` tokens).
        shuffle: Shuffle the training loader each epoch (seeded).
        trust_remote_code: passed to ``AutoTokenizer`` (the CLI links it to the model's).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        sources: list[str] | str = "bundled",
        weights: list[float] | None = None,
        num_samples: int = 128,
        seq_len: int = 256,
        batch_size: int = 16,
        seed: int = 42,
        num_workers: int = 0,
        val_samples: int = 0,
        text_field: str = "text",
        sampling: str = "concat",
        shuffle: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.trust_remote_code = bool(trust_remote_code)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}; set batch_size >= 1")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(val_samples, bool) or not isinstance(val_samples, int) or val_samples < 0:
            raise ValueError(f"val_samples must be an integer >= 0, got {val_samples!r}; use 0 to disable validation")
        self.sources, self._weights = _check_args(sources, weights, num_samples, seq_len, seed, sampling, text_field)
        self.tokenizer_name = tokenizer if isinstance(tokenizer, (str, os.PathLike)) or tokenizer is None else None
        self._tokenizer = None if self.tokenizer_name is not None or tokenizer is None else tokenizer
        self.weights = weights
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.val_samples = val_samples
        self.text_field = text_field
        self.sampling = sampling
        self.shuffle = shuffle
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None
        self.save_hyperparameters(ignore=["tokenizer"] if self._tokenizer is not None else None)

    # -- tokenizer ------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` (a tokenizer object, or a path) instead of the constructor's one.

        Drops samples built with a previous tokenizer.
        """
        if isinstance(tokenizer, (str, os.PathLike)):
            self.tokenizer_name, self._tokenizer = os.fspath(tokenizer), None
        else:
            if tokenizer is None:
                raise ValueError("set_tokenizer: tokenizer is None; pass a tokenizer object or path")
            self._tokenizer = tokenizer
        self.train_tokens = self.val_tokens = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer object (loaded from ``tokenizer`` on first access)."""
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError(
                    "tokenizer: none set; pass tokenizer=<path or hub name> or call datamodule.set_tokenizer(tok) before setup()"
                )
            self._tokenizer = load_tokenizer(os.fspath(self.tokenizer_name), self.trust_remote_code, required=True)
        return self._tokenizer

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Tokenize the sources and draw the samples (once; later calls reuse them)."""
        if self.train_tokens is not None:
            return
        self.train_tokens, self.val_tokens = sample_calibration_splits(
            self.tokenizer,
            self.sources,
            self.weights,
            (self.num_samples, self.val_samples),
            self.seq_len,
            self.seed,
            self.text_field,
            self.sampling,
        )

    def _loader(self, tokens: torch.Tensor, shuffle: bool) -> DataLoader:
        """A loader whose order depends only on ``seed`` and the epoch.

        The sampler is always a ``DistributedSampler`` (one replica when not distributed): Lightning calls its
        ``set_epoch`` every epoch, so a run resumed from a checkpoint sees the same batches as an uninterrupted
        one, and under DDP/FSDP2 each rank gets its own disjoint share (Lightning leaves such a sampler alone),
        the same share every epoch (:class:`RankShardSampler`).
        """
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas = torch.distributed.get_world_size() if dist else 1
        rank = torch.distributed.get_rank() if dist else 0
        sampler = RankShardSampler(TokenBlockDataset(tokens), num_replicas=replicas, rank=rank, shuffle=shuffle,
                                   seed=self.seed, drop_last=False)
        return DataLoader(
            TokenBlockDataset(tokens),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Calibration batches (shuffled with ``seed`` when ``shuffle``)."""
        if self.train_tokens is None:
            self.setup("fit")
        return self._loader(self.train_tokens, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out batches, or ``[]`` (no validation) when ``val_samples == 0``."""
        if self.train_tokens is None:
            self.setup("validate")
        if self.val_tokens is None or len(self.val_tokens) == 0:
            return []
        return self._loader(self.val_tokens, False)

    def calibration_tokens(self) -> torch.Tensor:
        """The ``(num_samples, seq_len)`` training samples (runs :meth:`setup` if needed)."""
        if self.train_tokens is None:
            self.setup()
        return self.train_tokens


def first_batches(datamodule: Any, num_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_batches`` batches of a datamodule's calibration (train) loader (merging and skipping
    calibrate on them)."""
    if datamodule is None:
        raise ValueError("trainer.datamodule: calibration callbacks need the CalibrationDataModule; pass "
                         "--data.* options or a datamodule to fit()")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) >= num_batches:
            break
    return batches
