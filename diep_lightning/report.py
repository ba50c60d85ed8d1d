"""What an export shows a reader: plots of the experts kept and their scores, and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diep_lightning.pruning import PruningPlan


def plot_plan(plan: PruningPlan, spec_counts: list[int], directory: Path, method: str = "DiEP") -> dict[str, Any]:
    """Experts kept per layer (against the count before) and a heatmap of the scores; returns the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures = {}
    layers = range(len(spec_counts))
    before = [len(s) for s in plan.scores]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(spec_counts) + 3), 4))
    ax.bar(layers, before, color="lightgray", label="before")
    ax.bar(layers, spec_counts, color="tab:blue", label="kept")
    for x, n in zip(layers, spec_counts):
        ax.text(x, n, str(n), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("routed experts")
    ax.set_title(f"Experts kept per layer ({plan.mode}, {plan.num_removed} of {sum(before)} removed)")
    ax.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(directory / "experts_per_layer.png", dpi=150)
    figures["experts_per_layer"] = fig
    width = max(len(s) for s in plan.scores)
    grid = torch.full((len(plan.scores), width), float("nan"))
    for i, row in enumerate(plan.scores):
        grid[i, : len(row)] = torch.tensor(row)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.22 * width + 3), max(4, 0.3 * len(plan.scores) + 1.5)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    labelled = False
    for layer, removed in enumerate(plan.removed):
        if removed:
            ax.scatter(removed, [layer] * len(removed), marker="x", color="red", s=18,
                       label=None if labelled else "removed")
            labelled = True
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert (original id)")
    ax.set_ylabel("MoE layer")
    ax.set_title("Expert scores (higher = kept); x = removed")
    if labelled:
        ax.legend(loc="upper right", fontsize=8)
    label = "DiEP score (alpha x beta)" if method.lower() == "diep" else f"{method} score"
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(directory / "expert_scores.png", dpi=150)
    figures["expert_scores"] = fig
    for f in figures.values():
        plt.close(f)
    return figures


def _text_name(source: Any) -> str:
    return {"generated": "generated (text sampled from the source model)",
            "search": "search (the search's calibration text)"}.get(str(source), str(source))


def model_card(source: str, plan: PruningPlan, counts: list[int], before: dict[str, int], after: dict[str, int],
                uniform: bool, method: str) -> str:
    """The export's README.md: source, method, sizes before and after, experts kept per layer, how to load it."""
    rows = "\n".join(f"| {i} | {len(s)} | {n} |" for i, (s, n) in enumerate(zip(plan.scores, counts)))
    load = ("AutoModelForCausalLM.from_pretrained(path)" if uniform
            else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    pct = lambda a, b: f"{100.0 * (1 - a / b):.1f}%" if b else "n/a"  # noqa: E731
    cal = plan.router_calibration
    router = (f"yes ({', '.join(cal['settings']['groups'])}; {cal['parameters']:,} parameters, {cal['steps_run']} "
              f"steps; held-out KL to the source model {cal['heldout_kl_before']:.4f} -> {cal['heldout_kl_after']:.4f}"
              + (f"; on {', '.join(map(_text_name, cal['sources']))}" if isinstance(cal.get("sources"), list) else "")
              + ")"
              if cal else "no")
    return f"""---
library_name: transformers
tags: [mixture-of-experts, pruning, diep]
---
# Pruned with diep_lightning

- Source model: `{source}`
- Method: {method}, mode `{plan.mode}`, expert sparsity {plan.sparsity:.3f}
- Experts removed: {plan.num_removed} of {sum(len(s) for s in plan.scores)}
- Merged: {merged_summary(plan)}; adaptive skipping calibrated: {"yes" if plan.skipping is not None else "no"}
- Routers calibrated by distillation from the source model: {router}

| | parameters | bytes |
|---|---|---|
| whole model before | {before['params']:,} | {before['bytes']:,} |
| whole model after | {after['params']:,} | {after['bytes']:,} ({pct(after['bytes'], before['bytes'])} smaller) |
| routed experts before | {before['expert_params']:,} | {before['expert_bytes']:,} |
| routed experts after | {after['expert_params']:,} | {after['expert_bytes']:,} ({pct(after['expert_bytes'], before['expert_bytes'])} smaller) |

| MoE layer | experts before | experts kept |
|---|---|---|
{rows}

Load: `{load}`, or `diep_lightning.load_pruned(path)`.
`pruning.json` lists, per layer, the original ids of the kept experts and the scores that chose them.
"""


def merged_summary(plan: Any) -> str:
    """'no', or how many merge groups were folded (of how many the guard weighed)."""
    groups = [g for layer in plan.merges for g in layer.values()]
    if not groups:
        return "no"
    folded = sum(g.get("merged", True) is not False for g in groups)
    return f"yes, {folded} of {len(groups)} groups (the others pruned plainly: merging raised their layer's error)" \
        if folded < len(groups) else "yes"
