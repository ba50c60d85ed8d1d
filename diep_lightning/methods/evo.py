"""``evo``: EvoESAP-style non-uniform allocation. Experts are ranked within each layer by a criterion (REAP,
frequency, or the scores a previous export recorded, e.g. DiEP's alpha); an evolutionary search chooses how many
each layer keeps under the global budget, by the pruned model's teacher-forced agreement with the full model on
calibration tokens (EvoESAP's fitness: the share of positions whose top-1 next token is unchanged; ties go to the
lower calibration loss)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from diep_lightning.methods.base import Scorer, register_method
from diep_lightning.methods.frequency import FrequencyScorer
from diep_lightning.methods.masked_loss import MaskedLoss
from diep_lightning.methods.reap import ReapScorer


@register_method
class EvoScorer(Scorer):
    """Evolutionary search over per-layer keep counts.

    Args:
        sparsity: the fraction of routed experts the allocation removes (the pruning must ask for the same).
        criterion: within-layer ranking: "reap", "frequency", or "recorded": the per-expert scores in
            ``scores_from`` (so DiEP's alpha can rank and the search only re-allocates).
        scores_from: an export directory (its ``pruning.json``) or a JSON file with ``"scores"``: one list per MoE
            layer, one score per original expert (a DiEP export records alpha * beta); only with "recorded".
        population: allocations per generation.
        generations: rounds of selection and mutation.
        seed: the search's random seed.
        reference_tokens: calibration tokens every evaluation runs over.
    """

    name = "evo"
    wants_batches = True

    def __init__(self, sparsity: float | None = None, criterion: str = "reap", population: int = 16,
                 generations: int = 20, seed: int = 0, reference_tokens: int = 8192,
                 scores_from: str | None = None) -> None:
        if sparsity is None or not 0 < sparsity < 1:
            raise ValueError(f"evo_sparsity: the evolutionary search needs the fraction of experts to remove, in "
                             f"(0, 1) (the same as the pruning's sparsity), got {sparsity!r}")
        if criterion not in ("reap", "frequency", "recorded"):
            raise ValueError(f"evo_criterion: expected 'reap', 'frequency' or 'recorded', got {criterion!r}")
        if (criterion == "recorded") != (scores_from is not None):
            raise ValueError("evo_scores_from: give it exactly when evo_criterion is 'recorded' (the scores that rank "
                             f"experts within each layer); got criterion {criterion!r}, scores_from {scores_from!r}")
        if population < 2 or generations < 1:
            raise ValueError(f"evo_population/evo_generations: need >= 2 and >= 1, got {population}/{generations}")
        self.sparsity, self.population, self.generations = sparsity, population, generations
        self.recorded = read_recorded_scores(scores_from) if scores_from is not None else None
        self.criterion = ReapScorer() if criterion == "reap" else FrequencyScorer()
        self.rng = random.Random(seed)
        self.evaluator = MaskedLoss(reference_tokens)
        self.history: list[float] = []
        self.keep: list[int] = []

    def setup(self, model, family, blocks):
        self.evaluator.setup(model, family, blocks)

    def observe_batch(self, batch):
        self.evaluator.keep(batch)

    def observe(self, family, block, hidden, index, weights):
        if self.recorded is None:
            self.criterion.observe(family, block, hidden, index, weights)

    def check(self, blocks, sparsity, mode):
        total = sum(b.num_experts for b in blocks)
        if self.recorded is not None and [len(s) for s in self.recorded] != [b.num_experts for b in blocks]:
            raise ValueError(f"evo_scores_from: the recorded scores have {[len(s) for s in self.recorded]} experts "
                             f"per layer, the model {[b.num_experts for b in blocks]}; record them on this model")
        if mode != "global" or round(sparsity * total) != round(self.sparsity * total):
            raise ValueError(f"evo_sparsity: the search allocates {round(self.sparsity * total)} removals across "
                             f"layers; prune with mode global and sparsity {self.sparsity} (got {mode}, {sparsity})")
        if round(self.sparsity * total) > sum(b.num_experts - b.top_k for b in blocks):
            raise ValueError(f"evo_sparsity: {self.sparsity} would leave a layer under its top-k")

    def _removed(self, keep: list[int], ranking: list[list[int]]) -> dict[int, list[int]]:
        return {layer: order[k:] for layer, (k, order) in enumerate(zip(keep, ranking))}

    def _mutate(self, keep: list[int], low: list[int], high: list[int]) -> list[int]:
        """Move one kept expert's slot from one layer to another, within each layer's bounds."""
        child = list(keep)
        for _ in range(100):
            a, b = self.rng.randrange(len(keep)), self.rng.randrange(len(keep))
            if a != b and child[a] < high[a] and child[b] > low[b]:
                child[a] += 1
                child[b] -= 1
                return child
        return child

    def scores(self, family, blocks):
        within = self.recorded if self.recorded is not None else self.criterion.scores(family, blocks)
        ranking = [sorted(range(len(s)), key=lambda e, s=s: -float(s[e])) for s in within]  # best first
        sizes, low = [b.num_experts for b in blocks], [b.top_k for b in blocks]
        budget = round(self.sparsity * sum(sizes))
        uniform = [n - budget // len(sizes) - (1 if i < budget % len(sizes) else 0) for i, n in enumerate(sizes)]
        uniform = [max(k, lo) for k, lo in zip(uniform, low)]
        while sum(sizes) - sum(uniform) < budget:  # the bounds pushed some removals elsewhere
            i = max(range(len(sizes)), key=lambda j: uniform[j] - low[j])
            uniform[i] -= 1

        def fitness(keep: list[int]) -> tuple[float, float]:
            agreement, loss = self.evaluator.evaluate(self._removed(keep, ranking))  # one pass for both
            return agreement, -loss

        population = [uniform] + [self._mutate(self._mutate(uniform, low, sizes), low, sizes)
                                  for _ in range(self.population - 1)]
        scored = sorted(((fitness(k), k) for k in population), reverse=True)
        for _ in range(self.generations):
            parents = [k for _, k in scored[: max(1, self.population // 2)]]
            children = [self._mutate(self.rng.choice(parents), low, sizes)
                        for _ in range(self.population - len(parents))]
            scored = sorted(scored[: len(parents)] + [(fitness(k), k) for k in children], reverse=True)
            self.history.append(scored[0][0][0])
        self.keep = scored[0][1]
        # kept experts score in (1, 2], removed ones in [-1, 0): a global selection of the budget takes exactly
        # the removed ones, whatever the layers' criterion scales
        out = []
        for k, order, n in zip(self.keep, ranking, sizes):
            score = torch.empty(n)
            for position, e in enumerate(order):
                score[e] = (2.0 - position / n) if position < k else -(position / n)
            out.append(score)
        return out


def read_recorded_scores(path: str) -> list[list[float]]:
    """Per-layer expert scores from an export's ``pruning.json`` (its ``layers[i].scores``) or a JSON file with a
    ``"scores"`` list of lists.

    Raises:
        ValueError: one line naming ``evo_scores_from``.
    """
    file = Path(path) / "pruning.json" if Path(path).is_dir() else Path(path)
    try:
        data = json.loads(file.read_text())
        scores = [layer["scores"] for layer in data["layers"]] if "layers" in data else data["scores"]
        scores = [[float(v) for v in layer] for layer in scores]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"evo_scores_from: cannot read per-layer scores from {str(file)!r} "
                         f"({type(err).__name__}: {err})") from None
    if not scores or not all(layer and all(math.isfinite(v) for v in layer) for layer in scores):
        raise ValueError(f"evo_scores_from: {str(file)!r} holds no scores, an empty layer or a non-finite score")
    return scores
