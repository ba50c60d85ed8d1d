"""``greedy``: remove, one at a time, the expert whose removal raises the calibration loss least, never leaving a
layer under its top-k; the removal order is the ranking (a reference for the best achievable allocation, one
model evaluation per candidate, meant for small models). The lazy variant (Minoux's accelerated greedy) re-evaluates
only the candidates whose last measured loss rise could still be the smallest, which is exact while removing more
experts never makes another removal cheaper; it reaches models the exact search is refused on."""

from __future__ import annotations

import heapq

import torch

from diep_lightning.methods.base import Scorer, register_method
from diep_lightning.methods.masked_loss import MaskedLoss


@register_method
class GreedyScorer(Scorer):
    """Greedy removal by calibration loss.

    Args:
        until: removal stops once this fraction of all routed experts is removed; pruning may ask for up to it.
        max_evaluations: refuse when the removals would need more loss evaluations than this.
        reference_tokens: calibration tokens every evaluation runs over.
        lazy: accelerated greedy: one evaluation per expert, then only re-evaluations of the candidate with the
            smallest last-measured rise until one measured at the current step is smallest; ``max_evaluations``
            then bounds the evaluations actually run.
    """

    name = "greedy"
    wants_batches = True

    def __init__(self, until: float = 0.5, max_evaluations: int = 5000, reference_tokens: int = 8192,
                 lazy: bool = False) -> None:
        if not 0 < until < 1:
            raise ValueError(f"greedy_until: a fraction of the experts in (0, 1), got {until!r}")
        self.until, self.max_evaluations, self.lazy = until, max_evaluations, bool(lazy)
        self.evaluator = MaskedLoss(reference_tokens)
        self.order: list[tuple[int, int]] = []

    def setup(self, model, family, blocks):
        self.evaluator.setup(model, family, blocks)

    def observe_batch(self, batch):
        self.evaluator.keep(batch)

    def _steps(self, blocks) -> int:
        total = sum(b.num_experts for b in blocks)
        room = sum(b.num_experts - b.top_k for b in blocks)
        return min(round(self.until * total), room)

    def _refuse_over_budget(self, blocks) -> None:
        steps, total = self._steps(blocks), sum(b.num_experts for b in blocks)
        # at most every remaining expert is a candidate; the lazy search's first pass is one per expert
        needed = total + 1 if self.lazy else sum(total - t for t in range(steps))
        if needed > self.max_evaluations:
            hint = "" if self.lazy else " (greedy_lazy: true needs far fewer)"
            raise ValueError(f"method: greedy would need up to {needed} loss evaluations, over max_evaluations="
                             f"{self.max_evaluations}{hint}; it is a reference for small models")

    def check(self, blocks, sparsity, mode):
        self._refuse_over_budget(blocks)
        total = sum(b.num_experts for b in blocks)
        steps = self._steps(blocks)
        if round(sparsity * total) > steps:
            raise ValueError(f"greedy_until: removal stops at {steps} experts, sparsity {sparsity} removes "
                             f"{round(sparsity * total)}; raise greedy_until")

    def _lazy_order(self, blocks) -> list[tuple[int, int]]:
        removed: dict[int, list[int]] = {b.index: [] for b in blocks}
        room = {b.index: b.num_experts - b.top_k for b in blocks}
        current = self.evaluator.loss(removed)
        # (last measured rise, step it was measured at, layer, expert)
        heap = [(self.evaluator.loss({**removed, b.index: [e]}) - current, 0, b.index, e)
                for b in blocks for e in range(b.num_experts)]
        heapq.heapify(heap)
        order: list[tuple[int, int]] = []
        while len(order) < self._steps(blocks):
            rise, step, layer, e = heapq.heappop(heap)
            if len(removed[layer]) >= room[layer]:
                continue  # the layer is at its top-k: the expert is no candidate any more
            if step == len(order):  # measured against the current set and still the smallest: take it
                removed[layer].append(e)
                order.append((layer, e))
                current += rise
                continue
            if self.evaluator.evaluations > self.max_evaluations:
                raise ValueError(f"method: the lazy greedy search passed max_evaluations={self.max_evaluations} "
                                 f"after {len(order)} removals; raise it")
            loss = self.evaluator.loss({**removed, layer: [*removed[layer], e]})
            heapq.heappush(heap, (loss - current, len(order), layer, e))
        return order

    def _exact_order(self, blocks) -> list[tuple[int, int]]:
        removed: dict[int, list[int]] = {b.index: [] for b in blocks}
        order: list[tuple[int, int]] = []
        for _ in range(self._steps(blocks)):
            best, best_loss = None, float("inf")
            for block in blocks:
                if block.num_experts - len(removed[block.index]) <= block.top_k:
                    continue
                for e in range(block.num_experts):
                    if e in removed[block.index]:
                        continue
                    loss = self.evaluator.loss({**removed, block.index: [*removed[block.index], e]})
                    if loss < best_loss:
                        best, best_loss = (block.index, e), loss
            removed[best[0]].append(best[1])
            order.append(best)
        return order

    def scores(self, family, blocks):
        self._refuse_over_budget(blocks)  # before any work, also when check() was not called first
        self.order = self._lazy_order(blocks) if self.lazy else self._exact_order(blocks)
        # removed first = lowest score; never removed: above every removed one
        scores = [torch.full((b.num_experts,), float(len(self.order) + 1)) for b in blocks]
        for step, (layer, e) in enumerate(self.order):
            scores[layer][e] = float(step)
        return scores
