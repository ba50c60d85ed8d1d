"""``naee``: per layer, the subset of the kept size whose layer output is closest to the original on the
calibration tokens (Lu et al., 2024). Exhaustive, so it refuses when a layer has too many subsets."""

from __future__ import annotations

import itertools
import math

import torch

from diep_lightning.families import MoEBlock
from diep_lightning.methods.base import Scorer, register_method


@register_method
class NaeeScorer(Scorer):
    """Exhaustive per-layer subset search on the layer output reconstruction error.

    Args:
        keep: experts each layer keeps (the size of the subsets searched).
        max_subsets: largest number of subsets per layer it agrees to try.
        max_tokens: calibration tokens kept per layer for the search (None: all of them, as NAEE does).
    """

    name = "naee"

    def __init__(self, keep: int | None = None, max_subsets: int = 20_000, max_tokens: int | None = None) -> None:
        if keep is None or isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"naee_keep: NAEE needs the number of experts each layer keeps (an integer >= 1, e.g. "
                             f"--model.naee_keep=4 for sparsity 0.5 of 8 experts), got {keep!r}")
        self.keep, self.max_subsets, self.max_tokens = keep, max_subsets, max_tokens
        self.hidden: dict[int, list[torch.Tensor]] = {}
        self.seen: dict[int, int] = {}

    def check(self, blocks, sparsity, mode):
        if mode != "uniform":
            raise ValueError("mode: NAEE searches each layer separately (same count per layer); set mode: uniform "
                             "in GlobalExpertPruning for method naee")
        for block in blocks:
            if not block.top_k <= self.keep <= block.num_experts:
                raise ValueError(f"naee_keep: {self.keep} experts per layer, but MoE layer {block.index} has "
                                 f"{block.num_experts} experts routed top-{block.top_k}; use {block.top_k}.."
                                 f"{block.num_experts}")
            wanted = block.num_experts - round(sparsity * block.num_experts)
            if wanted != self.keep:
                raise ValueError(f"naee_keep: {self.keep} experts per layer, but sparsity {sparsity} keeps {wanted} of "
                                 f"{block.num_experts} in MoE layer {block.index}; set --model.naee_keep={wanted}")
        self._refuse_huge_searches(blocks)

    def _refuse_huge_searches(self, blocks) -> None:
        for block in blocks:
            count = math.comb(block.num_experts, self.keep)
            if count > self.max_subsets:
                raise ValueError(
                    f"method: NAEE would try C({block.num_experts}, {self.keep}) = {count:.3g} "
                    f"subsets in layer {block.index}, over max_subsets={self.max_subsets}; exhaustive search is "
                    "infeasible here (use method: diep), or raise naee_max_subsets"
                )

    def observe(self, family, block, hidden, index, weights):
        seen = self.seen.get(block.index, 0)
        cap = self.max_tokens if self.max_tokens is not None else hidden.shape[0] + seen
        if seen >= cap:
            return
        take = hidden[: cap - seen].detach()
        self.hidden.setdefault(block.index, []).append(take)
        self.seen[block.index] = seen + take.shape[0]

    @torch.no_grad()
    def scores(self, family, blocks):
        result = []
        self._refuse_huge_searches(blocks)  # before any work, also when check() was not called first
        for block in blocks:
            hidden = torch.cat(self.hidden[block.index], 0).unsqueeze(0)
            reference = _block_output(block, hidden)
            best, best_err = None, math.inf
            for subset in itertools.combinations(range(block.num_experts), self.keep):
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
