"""Baseline expert scorers, run through the same module, CLI, pruning and export as DiEP.

Each scorer watches the frozen model route calibration tokens (no gradients, no training) and turns what it
saw into one score per expert, higher = keep. ``GlobalExpertPruning`` then removes the lowest scores exactly
as for DiEP, so every method writes the same export and ``pruning.json``.

- ``random``: uniform random scores (seeded); use ``mode: uniform`` for the usual per-layer random baseline.
- ``frequency``: how many tokens are routed to each expert (Expert Trimming / M-SMoE style).
- ``reap``: mean over routed tokens of router weight x ||expert output|| (REAP, Cerebras 2025).
- ``naee``: per layer, the subset of the kept size whose layer output is closest to the original on the
  calibration tokens (Lu et al., 2024); exhaustive, so it refuses when there are too many subsets.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
import torch

from diep_lightning.families import MoEBlock, MoEFamily

METHODS = ("diep", "random", "frequency", "reap", "naee")


class Scorer:
    """Accumulates routing statistics over calibration batches and returns per-expert scores."""

    def observe(self, family: MoEFamily, block: MoEBlock, hidden: torch.Tensor, index: torch.Tensor,
                weights: torch.Tensor) -> None:
        """Called each time ``block`` routes tokens (inside a no-grad forward)."""

    def check(self, blocks: Sequence[MoEBlock], sparsity: float | None, mode: str | None) -> None:
        """Fail early (before the statistics pass) on a setting the method cannot handle."""

    def scores(self, family: MoEFamily, blocks: Sequence[MoEBlock], sparsity: float | None = None,
               mode: str | None = None) -> list[torch.Tensor]:
        raise NotImplementedError


class RandomScorer(Scorer):
    """Uniform random scores from a seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, family, blocks, sparsity=None, mode=None):
        gen = torch.Generator().manual_seed(self.seed)
        return [torch.rand(b.num_experts, generator=gen) for b in blocks]


class FrequencyScorer(Scorer):
    """Number of routed tokens per expert."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}

    def observe(self, family, block, hidden, index, weights):
        counts = torch.bincount(index.flatten().cpu(), minlength=block.num_experts)[: block.num_experts]
        self.counts[block.index] = self.counts.get(block.index, 0) + counts.double()

    def scores(self, family, blocks, sparsity=None, mode=None):
        return [self.counts.get(b.index, torch.zeros(b.num_experts, dtype=torch.float64)).float() for b in blocks]


class ReapScorer(Scorer):
    """Mean over routed tokens of (router weight x L2 norm of the expert's output)."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def observe(self, family, block, hidden, index, weights):
        n = block.num_experts
        sums = self.sums.setdefault(block.index, torch.zeros(n, dtype=torch.float64))
        counts = self.counts.setdefault(block.index, torch.zeros(n, dtype=torch.float64))
        for e in index.unique().tolist():
            if e >= n:
                continue
            token, slot = (index == e).nonzero(as_tuple=True)
            out = family.expert_outputs(block, hidden[token], [e])[0]
            sums[e] += float((out.float().norm(dim=-1) * weights[token, slot].float()).sum())
            counts[e] += token.numel()

    def scores(self, family, blocks, sparsity=None, mode=None):
        return [(self.sums.get(b.index, torch.zeros(b.num_experts)) /
                 self.counts.get(b.index, torch.ones(b.num_experts)).clamp_min(1)).float() for b in blocks]


class NaeeScorer(Scorer):
    """Exhaustive per-layer subset search on the layer output reconstruction error.

    Args:
        max_subsets: largest number of subsets per layer it agrees to try.
        max_tokens: calibration tokens kept per layer for the search.
    """

    def __init__(self, max_subsets: int = 20_000, max_tokens: int = 2048) -> None:
        self.max_subsets, self.max_tokens = max_subsets, max_tokens
        self.hidden: dict[int, list[torch.Tensor]] = {}
        self.seen: dict[int, int] = {}

    @staticmethod
    def _keep(block: MoEBlock, sparsity: float) -> int:
        return block.num_experts - round(sparsity * block.num_experts)

    def check(self, blocks, sparsity, mode):
        if mode is not None and mode != "uniform":
            raise ValueError("mode: NAEE searches each layer separately (same count per layer); set mode: uniform "
                             "in GlobalExpertPruning for method naee")
        if sparsity is None:
            raise ValueError("method: naee needs GlobalExpertPruning (its sparsity sets the subset size)")
        for block in blocks:
            count = math.comb(block.num_experts, self._keep(block, sparsity))
            if count > self.max_subsets:
                raise ValueError(
                    f"method: NAEE would try C({block.num_experts}, {self._keep(block, sparsity)}) = {count:.3g} "
                    f"subsets in layer {block.index}, over max_subsets={self.max_subsets}; exhaustive search is "
                    "infeasible here (use method: diep), or raise naee_max_subsets"
                )

    def observe(self, family, block, hidden, index, weights):
        seen = self.seen.get(block.index, 0)
        if seen >= self.max_tokens:
            return
        take = hidden[: self.max_tokens - seen].detach()
        self.hidden.setdefault(block.index, []).append(take)
        self.seen[block.index] = seen + take.shape[0]

    @torch.no_grad()
    def scores(self, family, blocks, sparsity=None, mode=None):
        self.check(blocks, sparsity, mode)
        result = []
        for block in blocks:
            hidden = torch.cat(self.hidden[block.index], 0).unsqueeze(0)
            reference = _block_output(block, hidden)
            keep = self._keep(block, sparsity)
            best, best_err = None, math.inf
            for subset in itertools.combinations(range(block.num_experts), keep):
                removed = [e for e in range(block.num_experts) if e not in subset]
                with family.masked_routing(block, removed):
                    err = float((_block_output(block, hidden) - reference).float().pow(2).sum())
                if err < best_err:
                    best, best_err = subset, err
            scores = torch.zeros(block.num_experts)
            scores[list(best)] = 1.0
            result.append(scores)
        return result


def _block_output(block: MoEBlock, hidden: torch.Tensor) -> torch.Tensor:
    out = block.module(hidden)
    return out[0] if isinstance(out, tuple) else out


def make_scorer(method: str, seed: int = 0, naee_max_subsets: int = 20_000) -> Scorer | None:
    """The scorer of a baseline method (None for DiEP itself)."""
    if method == "diep":
        return None
    if method == "random":
        return RandomScorer(seed)
    if method == "frequency":
        return FrequencyScorer()
    if method == "reap":
        return ReapScorer()
    if method == "naee":
        return NaeeScorer(max_subsets=naee_max_subsets)
    raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")

