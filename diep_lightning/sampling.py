"""Calibration data for expert pruning.

DiEP (like GPTQ / SparseGPT / NAEE) calibrates on a small number of fixed-length token sequences
drawn from C4 train (the paper uses 128 samples). This module turns text sources into such a set:

* :func:`load_calibration_tokens`: plain function returning a ``(num_samples, seq_len)`` LongTensor,
  for code outside Lightning (callbacks, scripts).
* :class:`~diep_lightning.data.CalibrationDataModule`: the same samples as a ``LightningDataModule`` yielding
  batches ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}`` (in :mod:`diep_lightning.data`).

Sources
    ``"bundled"``: the 256 C4 ``en`` train documents shipped in ``diep_lightning/assets``
    (ODC-BY 1.0, see ``assets/LICENSE_C4.md``); ``"c4"``: ``allenai/c4`` ``en`` train streamed from the
    Hugging Face hub (online only); a ``.jsonl`` file (one JSON object per line, text in
    ``text_field``); a ``.txt`` file (the whole file is one document); or a directory, searched
    recursively for ``.jsonl`` and ``.txt`` files.

Sampling (``sampling="concat"``, the default)
    The documents of a source are shuffled (seeded), tokenized without special tokens and
    concatenated with the tokenizer's EOS token between documents. The stream of ``L`` tokens is cut,
    after a random offset, into ``L // seq_len`` disjoint slots, and a random subset of the slots is
    taken. Samples are therefore never overlapping (train and validation samples are disjoint) and may
    span document boundaries; a source must hold at least ``n * seq_len`` tokens for ``n`` samples.
    This uses every token of short-document corpora such as C4, whose median document is shorter than
    a 2048-token window.

Sampling (``sampling="document"``)
    The GPTQ / SparseGPT recipe: for each sample pick a random document with at least ``seq_len``
    tokens and a random window inside it (with replacement, so windows may overlap). Needs long
    documents; with C4 and ``seq_len=2048`` few documents qualify, so prefer the ``"c4"`` source.

With several sources, ``weights`` gives the fraction of samples drawn from each (default: equal);
counts are rounded with the largest-remainder method and the samples of all sources are shuffled
together. Everything is deterministic given ``seed`` (the ``"c4"`` stream aside, which depends on the
hub's shard order). Train samples do not depend on ``val_samples``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diep_lightning.loading import load_tokenizer
from diep_lightning.documents import BUNDLED_C4_PATH, check_source, iter_c4, local_documents, normalize_sources

__all__ = ["BUNDLED_C4_PATH", "load_calibration_tokens", "sample_calibration_splits"]

_SAMPLINGS = ("concat", "document")
_C4_MAX_DOCS = 200_000


def _check_args(
    sources: Sequence[str] | str,
    weights: Sequence[float] | None,
    num_samples: int,
    seq_len: int,
    seed: int,
    sampling: str,
    text_field: str,
) -> tuple[list[str], list[float]]:
    """Validate the cheap arguments; return (sources, normalised weights)."""
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}; set {name} >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if sampling not in _SAMPLINGS:
        raise ValueError(f"sampling must be one of {list(_SAMPLINGS)}, got {sampling!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    srcs = normalize_sources(sources)
    for i, src in enumerate(srcs):
        check_source(src, i)
    return srcs, check_weights(weights, srcs)


def check_weights(weights: Sequence[float] | float | None, sources: Sequence[str]) -> list[float]:
    """One share per source, finite, >= 0 with a positive sum; returned normalised (None: equal shares)."""
    if weights is None:
        return [1.0 / len(sources)] * len(sources)
    w = [float(x) for x in ([weights] if isinstance(weights, (int, float)) else weights)]
    if len(w) != len(sources):
        raise ValueError(f"weights: {len(w)} entries for {len(sources)} sources {list(sources)}; give one weight per "
                         "source (or weights=None)")
    if any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights: must be finite numbers >= 0 with a positive sum, got {w}")
    return [x / sum(w) for x in w]


def _allocate(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integer counts proportional to ``weights`` (largest remainder, ties to the first)."""
    raw = [n * w for w in weights]
    counts = [int(np.floor(r)) for r in raw]
    rest = n - sum(counts)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# tokenizing and sampling
# --------------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    if not docs:
        return []
    out = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in out]


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else None


def _concat(doc_ids: list[list[int]], order: np.ndarray, sep: int | None) -> np.ndarray:
    parts: list[np.ndarray] = []
    for j, k in enumerate(order):
        if j and sep is not None:
            parts.append(np.asarray([sep], dtype=np.int64))
        parts.append(np.asarray(doc_ids[k], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _windows_concat(
    doc_ids: list[list[int]], counts: list[int], seq_len: int, rng: np.random.Generator, sep: int | None, tag: str
) -> list[np.ndarray]:
    order = rng.permutation(len(doc_ids))
    stream = _concat(doc_ids, order, sep)
    need = sum(counts) * seq_len
    n_slots = len(stream) // seq_len
    if n_slots < sum(counts):
        raise ValueError(
            f"{tag}: found {len(stream):,} tokens but {sum(counts)} x seq_len={seq_len} = {need:,} are needed; "
            "lower num_samples or seq_len, or add sources"
        )
    shift = int(rng.integers(0, len(stream) - n_slots * seq_len + 1))
    slots = rng.permutation(n_slots)
    out, start = [], 0
    for c in counts:
        idx = slots[start : start + c]
        start += c
        if c == 0:
            out.append(np.zeros((0, seq_len), dtype=np.int64))
            continue
        offs = shift + idx * seq_len
        out.append(np.stack([stream[o : o + seq_len] for o in offs]))
    return out


def _windows_document(
    doc_ids: list[list[int]], counts: list[int], seq_len: int, rng: np.random.Generator, tag: str
) -> list[np.ndarray]:
    eligible = [d for d in doc_ids if len(d) >= seq_len]
    if not eligible:
        longest = max((len(d) for d in doc_ids), default=0)
        raise ValueError(
            f"{tag}: no document has >= seq_len={seq_len} tokens (longest: {longest:,}) for sampling='document'; "
            "lower seq_len, use sampling='concat', or add sources with longer documents"
        )
    out = []
    for c in counts:
        rows = []
        for _ in range(c):
            d = eligible[int(rng.integers(0, len(eligible)))]
            s = int(rng.integers(0, len(d) - seq_len + 1))
            rows.append(np.asarray(d[s : s + seq_len], dtype=np.int64))
        out.append(np.stack(rows) if rows else np.zeros((0, seq_len), dtype=np.int64))
    return out


def _c4_doc_ids(tokenizer: Any, seed: int, need_tokens: int, need_docs: int, seq_len: int, sampling: str) -> list[list[int]]:
    """Stream C4 until there are 2x the needed tokens (concat) or enough long documents (document)."""
    doc_ids: list[list[int]] = []
    total = long_docs = 0
    buf: list[str] = []

    def flush() -> None:
        nonlocal total, long_docs
        for ids in _encode(tokenizer, buf):
            doc_ids.append(ids)
            total += len(ids) + 1
            long_docs += len(ids) >= seq_len
        buf.clear()

    for n, text in enumerate(iter_c4(seed)):
        buf.append(text)
        if len(buf) >= 256:
            flush()
            done = long_docs >= need_docs if sampling == "document" else total >= 2 * need_tokens
            if done or n >= _C4_MAX_DOCS:
                break
    flush()
    return doc_ids


def sample_calibration_splits(
    tokenizer: Any,
    sources: Sequence[str] | str = "bundled",
    weights: Sequence[float] | None = None,
    split_sizes: Sequence[int] = (128,),
    seq_len: int = 256,
    seed: int = 42,
    text_field: str = "text",
    sampling: str = "concat",
) -> list[torch.Tensor]:
    """Draw several disjoint sets of calibration sequences (e.g. train and validation).

    Each split is allocated across sources by ``weights`` independently, so the first split does not
    change when a later split's size changes.

    Args:
        tokenizer: A Hugging Face tokenizer object (anything callable like one, with ``eos_token_id``).
        sources: See the module docstring.
        weights: Fraction of each split drawn from each source; ``None`` means equal.
        split_sizes: Number of sequences in each split (zeros allowed, first must be > 0).
        seq_len: Tokens per sequence.
        seed: Random seed.
        text_field: JSON field holding the text in ``.jsonl`` sources.
        sampling: ``"concat"`` or ``"document"`` (see the module docstring).

    Returns:
        One ``(n, seq_len)`` int64 tensor per split.
    """
    sizes = [int(s) for s in split_sizes]
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"split_sizes must be non-negative counts, got {list(split_sizes)}")
    srcs, w = _check_args(sources, weights, max(sizes[0], 1), seq_len, seed, sampling, text_field)
    if tokenizer is None:
        raise ValueError("tokenizer: none given; pass a tokenizer object (or a path to CalibrationDataModule)")
    per_source = [_allocate(n, w) for n in sizes]  # [split][source]
    sep = _eos_id(tokenizer)
    chunks: list[list[np.ndarray]] = [[] for _ in sizes]
    for i, src in enumerate(srcs):
        counts = [per_source[k][i] for k in range(len(sizes))]
        if sum(counts) == 0:
            continue
        tag = f"sources[{i}]={src!r}"
        rng = np.random.default_rng([seed, i])
        if src == "c4":
            doc_ids = _c4_doc_ids(tokenizer, seed + i, sum(counts) * seq_len, sum(counts), seq_len, sampling)
        else:
            doc_ids = _encode(tokenizer, local_documents(src, text_field, tag))
        if sampling == "concat":
            wins = _windows_concat(doc_ids, counts, seq_len, rng, sep, tag)
        else:
            wins = _windows_document(doc_ids, counts, seq_len, rng, tag)
        for k, arr in enumerate(wins):
            chunks[k].append(arr)
    out = []
    for k, parts in enumerate(chunks):
        arr = np.concatenate(parts) if parts else np.zeros((0, seq_len), dtype=np.int64)
        perm = np.random.default_rng([seed, 10_000 + k]).permutation(len(arr))
        out.append(torch.from_numpy(np.ascontiguousarray(arr[perm])).long())
    return out


def load_calibration_tokens(
    tokenizer: Any,
    sources: Sequence[str] | str = "bundled",
    weights: Sequence[float] | None = None,
    num_samples: int = 128,
    seq_len: int = 256,
    seed: int = 42,
    text_field: str = "text",
    sampling: str = "concat",
) -> torch.Tensor:
    """Return ``num_samples`` calibration sequences as a ``(num_samples, seq_len)`` int64 tensor.

    Same samples as ``CalibrationDataModule(...).train_tokens`` for the same arguments.

    Args:
        tokenizer: A tokenizer object, or a path / hub name loaded with ``AutoTokenizer``.
        sources: ``"bundled"``, ``"c4"``, a ``.jsonl`` / ``.txt`` path, a directory, or a list of those.
        weights: Fraction of the samples drawn from each source (default: equal).
        num_samples: Number of sequences.
        seq_len: Tokens per sequence.
        seed: Random seed; the result is deterministic given it.
        text_field: JSON field holding the text in ``.jsonl`` sources.
        sampling: ``"concat"`` (disjoint windows of the concatenated stream) or ``"document"``
            (GPTQ-style random window of a random long-enough document).

    Returns:
        LongTensor of shape ``(num_samples, seq_len)``.
    """
    _check_args(sources, weights, num_samples, seq_len, seed, sampling, text_field)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(os.fspath(tokenizer), required=True)
    (train,) = sample_calibration_splits(
        tokenizer, sources, weights, (num_samples,), seq_len, seed, text_field, sampling
    )
    return train


