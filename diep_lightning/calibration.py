"""What callbacks observe on calibration tokens: each MoE block's inputs and routing, and expert similarity.

Merging (which survivor a pruned expert resembles), skipping (gamma calibration) and the baselines'
statistics all start from the same observation: run the model on a few calibration batches and record,
per block, the tokens entering its experts and the routing chosen for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diep_lightning.families import MoEBlock, MoEFamily


@dataclass
class BlockObservation:
    """Calibration tokens seen by one MoE block.

    Attributes:
        hidden: (T, H) inputs of the block's experts.
        index: (T, k) experts chosen per token.
        weights: (T, k) their routing weights.
    """

    hidden: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor


@torch.no_grad()
def observe_blocks(model: nn.Module, family: MoEFamily, batches: Iterable[dict[str, torch.Tensor]],
                   max_tokens: int | None = 8192) -> dict[int, BlockObservation]:
    """Run ``model`` on ``batches`` and keep, per block, up to ``max_tokens`` tokens' expert inputs and routing."""
    blocks = family.blocks(model)
    store: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {b.index: [] for b in blocks}
    counts = {b.index: 0 for b in blocks}

    def sink(block: MoEBlock, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        if max_tokens is not None and counts[block.index] >= max_tokens:
            return
        take = hidden.shape[0] if max_tokens is None else min(hidden.shape[0], max_tokens - counts[block.index])
        store[block.index].append((hidden[:take].detach().float().cpu(), index[:take].detach().cpu(),
                                   weights[:take].detach().float().cpu()))
        counts[block.index] += take

    hooks = family.install_routing_capture(blocks, sink)
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            model(input_ids=batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device),
                  use_cache=False)
            if max_tokens is not None and all(c >= max_tokens for c in counts.values()):
                break
    finally:
        hooks.remove()
    return {i: BlockObservation(*(torch.cat(parts, 0) for parts in zip(*rows))) for i, rows in store.items() if rows}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between two (T, H) representations of the same tokens."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if denom > 0 else 0.0


def cka_matrix(outputs: torch.Tensor, block_bytes: int = 1 << 28) -> torch.Tensor:
    """Pairwise linear CKA of experts' outputs, ``outputs`` of shape (E, T, H); returns (E, E).

    CKA(i, j) = <K_i, K_j> / (|K_i| |K_j|) with K_e = X_e X_e^T over the centred outputs. Pairing feature-space
    products costs E^2 T H^2 (hours per layer at 128 experts of width 2048); the token Grams cost E T^2 H, built a
    band of rows at a time (``block_bytes`` of them for all experts) whose products give every pair at once. The
    cheaper form is used."""
    n, t, h = outputs.shape
    if 2 * t > n * h:  # more tokens than the pairs' features: the feature-space form is cheaper
        return _cka_features(outputs)
    centred = outputs.float()
    centred = centred - centred.mean(1, keepdim=True)
    keys = centred.transpose(1, 2)
    rows = max(1, block_bytes // (4 * n * t))
    inner = torch.zeros(n, n, dtype=torch.float64)
    for start in range(0, t, rows):  # rows start.. of every K_e, accumulated in float64
        band = torch.bmm(centred[:, start:start + rows], keys).reshape(n, -1).double()
        inner += band @ band.T
    return _normalised(inner)


def _cka_features(outputs: torch.Tensor) -> torch.Tensor:
    """:func:`cka_matrix` through (H, H) feature products, for few experts and many tokens."""
    n = outputs.shape[0]
    centred = outputs.double()
    centred = centred - centred.mean(1, keepdim=True)
    inner = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            inner[i, j] = inner[j, i] = (centred[j].T @ centred[i]).norm() ** 2
    return _normalised(inner)


def _normalised(inner: torch.Tensor) -> torch.Tensor:
    """CKA from the (E, E) matrix of Gram inner products; an expert with constant outputs gets 0 off the diagonal."""
    norms = inner.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    result = torch.where(denom > 0, inner / denom.clamp(min=1e-300), torch.zeros_like(inner))
    result.fill_diagonal_(1.0)
    return result.float()


def expert_outputs(family: MoEFamily, block: MoEBlock, observation: BlockObservation,
                   expert_ids: Sequence[int] | None = None) -> torch.Tensor:
    """(E, T, H) outputs of the block's experts on the observed tokens, computed where the block lives."""
    param = next(block.experts.parameters())
    hidden = observation.hidden.to(param.device, param.dtype)
    with torch.no_grad():
        return family.expert_outputs(block, hidden, expert_ids).float().cpu()
