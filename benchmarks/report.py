"""The benchmark's report: RESULTS.md from a run's results (quality tables, paired comparisons, what calibration
gives back, where each target stands) and the quality-against-sparsity plots."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.recovery import calibration_text, recovery_section
from benchmarks.rows import (ALLOCATORS, COMPARED, HEADLINE, LABELS, LOWER_IS_BETTER, TASKS)  # noqa: F401
from benchmarks.sections import kept_sections, today_section


def machine(threads: int) -> str:
    """The CPU, cores, threads and torch build a run measured on (timings differ about 2.4x between CPUs)."""
    from tools.machine import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} CPU cores, {threads} thread(s), torch {torch.__version__}"



def _se(entries: list[dict], task: str) -> str:
    """`` (se X)``: the mean over seeds of lm-eval's standard error of ``task``, or nothing without one."""
    values = [e["metrics"][f"{task}_stderr"] for e in entries if f"{task}_stderr" in e.get("metrics", {})]
    return f" (se {statistics.mean(values):.2g})" if values else ""


def _refusal(res: dict[str, Any], method: str) -> str | None:
    """Why the quality run refused ``method`` (its first sparsity's entry), or None when it ran."""
    entries = next(iter(res["quality"].get(method, {}).values()), [])
    return next((e["refused"] for e in entries if "refused" in e), None)


def _summary(entries: list[dict], task: str) -> tuple[float, float] | None:
    values = [e["metrics"].get(task) for e in entries if "metrics" in e and e["metrics"].get(task) is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)




def _documents(entries: list[dict], task: str) -> list | None:
    """Each document's headline value, averaged over the entries (seeds); a perplexity document is
    ``[loglikelihood, words]``."""
    runs = [e["metrics"]["per_document"][task] for e in entries
            if e.get("metrics", {}).get("per_document", {}).get(task)]
    if not runs or len({len(r) for r in runs}) != 1:
        return None
    if task in LOWER_IS_BETTER:
        return [[statistics.mean(r[i][0] for r in runs), runs[0][i][1]] for i in range(len(runs[0]))]
    return [statistics.mean(r[i] for r in runs) for i in range(len(runs[0]))]


def paired_bootstrap(a: list, b: list, task: str, iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """A against B on the same documents: the perplexity ratio A / B (other tasks: the difference A - B) and its
    95% paired-bootstrap interval, documents resampled with replacement."""
    n = len(a)
    idx = torch.randint(0, n, (iters, n), generator=torch.Generator().manual_seed(seed))
    if task in LOWER_IS_BETTER:
        ll_a, ll_b, words = (torch.tensor([d[k] for d in docs], dtype=torch.float64)
                             for docs, k in ((a, 0), (b, 0), (a, 1)))

        def ratio(rows: Any) -> torch.Tensor:
            w = words[rows].sum(-1)
            return torch.exp((ll_b[rows].sum(-1) - ll_a[rows].sum(-1)) / w)

        point, boot = float(ratio(torch.arange(n))), ratio(idx)
    else:
        diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
        point, boot = float(diff.mean()), diff[idx].mean(-1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, low, high


def same_plan_sentence(res: dict[str, Any], sparsity: str, method: str, base: str, label: str) -> str:
    """'. <label> against <base> (seed 0, the same plan): ...' with paired intervals, or '' without both rows."""
    parts = []
    for task, words in (("kit_wikitext2", "perplexity x"), ("kit_blimp", "BLiMP ")):
        rows = [[e for e in res["quality"].get(m, {}).get(sparsity, []) if e.get("seed") == 0][:1] for m in (method, base)]
        docs = [_documents(r, task) if r else None for r in rows]
        if None in docs or len(docs[0]) != len(docs[1]):
            continue
        point, low, high = paired_bootstrap(docs[0], docs[1], task)
        shown = (f"{point:.3f} [{low:.3f}, {high:.3f}]" if task in LOWER_IS_BETTER else
                 f"{100 * point:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]")
        said = verdict(task, low, high)
        parts.append(f"{words}{shown} {said}")
    return f". {label} against {LABELS.get(base, base)} of the same plan (seed 0): {', '.join(parts)}" if parts else ""


def verdict(task: str, low: float, high: float) -> str:
    """``better`` / ``worse`` for DiEP when the whole interval says so, else ``within noise``."""
    if task in LOWER_IS_BETTER:  # a perplexity ratio DiEP / method
        return "better" if high < 1 else "worse" if low > 1 else "within noise"
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


def comparisons(res: dict[str, Any], sparsity: str) -> dict[str, dict[str, tuple[float, float, float, str]]]:
    """peer -> task -> (point, low, high, verdict) for DiEP (its seeds averaged per document) against each peer."""
    diep = res["quality"].get("diep", {}).get(sparsity, [])
    out: dict[str, dict[str, tuple[float, float, float, str]]] = {}
    for peer in COMPARED:
        entries = res["quality"].get(peer, {}).get(sparsity, [])
        for task in ("kit_wikitext2", "kit_blimp"):
            a, b = _documents(diep, task), _documents(entries, task)
            if a is None or b is None or len(a) != len(b):
                continue
            point, low, high = paired_bootstrap(a, b, task)
            out.setdefault(peer, {})[task] = (point, low, high, verdict(task, low, high))
    return out


def comparison_section(results: dict[str, Any]) -> list[str]:
    """DiEP against every other method, document by document, with 95% paired-bootstrap intervals."""
    lines = ["## DiEP against each method, paired", "",
             "DiEP (its seeds averaged per document) against each method on the same documents: WikiText-2 word "
             "perplexity as the ratio DiEP / method (< 1: DiEP better) and BLiMP as DiEP's accuracy minus the "
             "method's, in points, each with its 95% paired-bootstrap interval over articles / pairs (2000 "
             "resamples). A verdict is `better` or `worse` only when the whole interval says so, else `within "
             "noise`; the spread over DiEP's seeds is in the quality tables (± std).", "",
             "| model | sparsity | method | perplexity DiEP / method [95%] | verdict | BLiMP DiEP - method, points [95%] "
             "| verdict |", "|---|---|---|---|---|---|---|"]
    for name, res in results["models"].items():
        for sparsity in sorted(res.get("quality", {}).get("diep", {}), key=float):
            for peer, tasks in comparisons(res, sparsity).items():
                cells = []
                for task in ("kit_wikitext2", "kit_blimp"):
                    if task not in tasks:
                        cells += ["n/a", ""]
                        continue
                    point, low, high, said = tasks[task]
                    scale = 1 if task in LOWER_IS_BETTER else 100
                    cells += [f"{point * scale:.3g} [{low * scale:.3g}, {high * scale:.3g}]", said]
                lines.append(f"| {name} | {float(sparsity):.0%} | {peer} | " + " | ".join(cells) + " |")
    return lines + [""]


def _means(res: dict[str, Any], sparsity: str, task: str) -> dict[str, float]:
    """method -> mean metric over seeds at one sparsity (methods that were refused or lack it are left out)."""
    means = {}
    for method, by_sparsity in res["quality"].items():
        summary = _summary(by_sparsity.get(sparsity, []), task)
        if summary is not None:
            means[method] = summary[0]
    return means


TARGETS_FILE = Path(__file__).resolve().parent / "targets.json"


def targets_section(results: dict[str, Any]) -> list[str]:
    """Where each target of ``targets.json`` stands, computed from the figures above: ordering per model and
    sparsity, and each check."""
    t = json.loads(TARGETS_FILE.read_text())
    lines = ["## Where each target stands", "",
             "Computed from the tables above (means over seeds). Perplexity: ratio to the full model, lower is "
             "better; BLiMP: accuracy, higher is better.", "",
             "| model, sparsity | perplexity ratio, best first | BLiMP, best first |", "|---|---|---|"]
    checks: list[str] = []
    for name, res in results["models"].items():
        full = res["full"]
        sparsities = sorted({s for by_s in res["quality"].values() for s in by_s}, key=float) if full.get("kit_wikitext2") else []
        for sparsity in sparsities:
            ppl = {m: v / full["kit_wikitext2"] for m, v in _means(res, sparsity, "kit_wikitext2").items()}
            blimp = _means(res, sparsity, "kit_blimp")
            order_p = ", ".join(f"{LABELS.get(m, m)} {v:.2f}" for m, v in sorted(ppl.items(), key=lambda kv: kv[1]))
            order_b = ", ".join(f"{LABELS.get(m, m)} {v:.3f}" for m, v in sorted(blimp.items(), key=lambda kv: -kv[1]))
            lines.append(f"| {name} {float(sparsity):.0%} | {order_p} | {order_b} |")
            if "diep" in ppl:
                said = comparisons(res, sparsity)

                def grouped(task: str) -> str:
                    by_verdict: dict[str, list[str]] = {}
                    for peer in COMPARED:
                        if task in said.get(peer, {}):
                            by_verdict.setdefault(said[peer][task][3], []).append(peer)
                    return "; ".join(f"{v} than {', '.join(p)}" if v != "within noise" else f"within noise of {', '.join(p)}"
                                     for v, p in sorted(by_verdict.items())) or "no paired figures"

                # merging + calibration against pruning + calibration on the same calibration text
                same_text = ("diep_cal" if calibration_text("diep_merge_cal", res["quality"].get(
                    "diep_merge_cal", {}).get(sparsity, [])) == "generated" else "diep_search_cal")
                checks.append(f"- {name} {float(sparsity):.0%}: on perplexity DiEP is {grouped('kit_wikitext2')}. "
                              f"On BLiMP: {grouped('kit_blimp')}"
                              + same_plan_sentence(res, sparsity, "diep_merge", "diep", "Merging")
                              + same_plan_sentence(res, sparsity, "diep_merge_cal", same_text, "Merging + calibration")
                              + ".")
            seed0 = {m: e[0]["metrics"].get("kit_blimp") for m, e in
                     ((m, res["quality"].get(m, {}).get(sparsity, [])) for m in ("diep", "diep_skip")) if e and "metrics" in e[0]}
            if len(seed0) == 2 and None not in seed0.values():
                lost = 100 * (seed0["diep"] - seed0["diep_skip"])
                limit = t["skipping_blimp_loss_points_max"]
                state = "met" if lost <= limit else "missed"
                pairs = [_documents(res["quality"][m][sparsity][:1], "kit_blimp") for m in ("diep", "diep_skip")]
                if None not in pairs and len(pairs[0]) == len(pairs[1]):
                    _, low, high = paired_bootstrap(pairs[0], pairs[1], "kit_blimp")
                    state += (f" (95% paired interval {100 * low:+.1f} to {100 * high:+.1f}"
                              + ("; within noise of the target" if lost > limit and 100 * low <= limit else "") + ")")
                checks.append(f"- {name} {float(sparsity):.0%}: BLiMP lost to skipping (same plan, seed 0): {lost:+.1f} "
                              f"points (target <= {limit:g}): {state}.")
        cost = res.get("cost", {})
        floor, diep, naee = cost.get("floor", {}), cost.get("diep", {}), cost.get("naee", {})
        if "wall_s" in floor and "wall_s" in diep:
            wall, mem = diep["wall_s"] / floor["wall_s"], diep["peak_rss_mb"] / floor["peak_rss_mb"]
            wall_max, mem_max = t["search_wall_ratio_max"], t["search_memory_ratio_max"]
            checks.append(f"- {name}: DiEP search {wall:.2f}x the floor's wall time (target <= {wall_max:g}: "
                          f"{'met' if wall <= wall_max else 'missed'}) and {mem:.2f}x its peak memory (target <= "
                          f"{mem_max:g}: {'met' if mem <= mem_max else 'missed'}).")
        if "wall_s" in naee and "wall_s" in diep:
            ratio = naee["wall_s"] / diep["wall_s"]
            least = t["naee_over_diep_time_min"]
            checks.append(f"- {name}: NAEE time / DiEP time = {ratio:.2f} (target >= {least:g}: "
                          f"{'met' if ratio >= least else 'missed'}).")
        elif "error" in naee:
            checks.append(f"- {name}: NAEE refused ({(_refusal(res, 'naee') or naee['error'])[:100]}).")
        decode = res.get("decode", {})
        if "full_skip" in decode and "pruned_50_skip" in decode:
            shown = ", ".join(f"decode {label} {decode[label]['batch_1'] / decode['full']['batch_1']:.2f}x / "
                              f"{decode[label]['batch_16'] / decode['full']['batch_16']:.2f}x"
                              for label in ("full_skip", "pruned_50_skip"))
            checks.append(f"- {name}: {shown} (batch 1 / 16) of the full model; overhead-bound at this size, so not "
                          "where the speed targets are judged (see Speed at real layer shapes).")
    return lines + [""] + checks + [""]


def write_report(results: dict[str, Any], args: argparse.Namespace, out: Path, command: str) -> None:
    combined = any("measured_by" in res for res in results["models"].values())  # set only by --combine
    lines = ["# Benchmark results", "", f"Command: `{command}`", "",
             ("" if combined else f"Machine: {machine(args.threads)}; ") + f"Evaluation: {args.limit} documents per task, {args.blimp_limit} pairs per BLiMP "
             f"paradigm, {args.wikitext_limit} WikiText-2 test articles; search: {args.epochs} epochs, "
             f"{args.num_samples} x {args.seq_len} tokens, batch {args.batch_size}.", ""]
    if combined:
        lines += ["Merged from separate runs (`--combine`); each model's section names the command and machine that "
                  "measured it. The settings above are the first run's.", ""]
    elif getattr(args, "jobs", 1) > 1:
        lines += [f"The models' quality runs went in {args.jobs} parallel processes; search cost and decode speed were "
                  "measured afterwards, one model at a time, on an otherwise idle machine.", ""]
    if results.get("resumed"):
        lines += ["Resumed (`--resume`): these parts were finished by an earlier, interrupted run of the same command "
                  f"and settings into the same folder (each part's machine is in results/run.json): "
                  f"{', '.join(results['resumed'])}.", ""]
    for model_name, res in results["models"].items():
        lines += [f"## {model_name}", ""]
        if res.get("measured_by"):
            lines += [f"Measured by: `{res['measured_by']}`" + (f" on {res['machine']}." if res.get("machine") else "."), ""]
        if res.get("checkpoint_sha256"):
            lines += [f"Checkpoint: `model.safetensors` sha256 `{res['checkpoint_sha256'][:16]}…` "
                      f"(compare with `sha256sum models/{model_name}/model.safetensors`).", ""]
        lines += ["Quality relative to the full model (mean ± std over seeds where several; se: lm-eval's standard "
                  "error over documents/pairs (bootstrap for perplexity), mean over seeds; perplexity: lower is "
                  "better, ratios > 1 are worse; accuracies: ratio of accuracies).", ""]
        full = res["full"]
        lines.append("| method | sparsity | " + " | ".join(TASKS) + " |")
        lines.append("|---|---|" + "---|" * len(TASKS))
        lines.append("| full | 0 | " + " | ".join(f"{full.get(t, float('nan')):.4g}" + _se([{"metrics": full}], t)
                                               for t in TASKS) + " |")
        for method, by_sparsity in res["quality"].items():
            for sparsity, entries in by_sparsity.items():
                if entries and "refused" in entries[0]:
                    lines.append(f"| {method} | {sparsity} | refused: {entries[0]['refused'][:90]} |")
                    continue
                cells = []
                for task in TASKS:
                    summary = _summary(entries, task)
                    if summary is None or not full.get(task):
                        cells.append("n/a")
                        continue
                    mean, std = summary
                    cells.append(f"{mean:.4g}" + (f" ± {std:.2g}" if len(entries) > 1 else "") + _se(entries, task) +
                                 f" ({mean / full[task]:.3f}x)")
                lines.append(f"| {method} | {sparsity} | " + " | ".join(cells) + " |")
        allocations = [(m, sp, entries[0]["kept_per_layer"]) for m in ALLOCATORS
                       for sp, entries in res["quality"].get(m, {}).items() if entries and "kept_per_layer" in entries[0]]
        if allocations:
            lines += ["", "Experts kept per MoE layer by the non-uniform allocations (DiEP: its first seed):", "",
                      "| method | sparsity | kept per layer |", "|---|---|---|"]
            lines += [f"| {m} | {sp} | {' '.join(map(str, kept))} |" for m, sp, kept in allocations]
        evaluations = res.get("reference_evaluations", {})
        if evaluations:
            lines += ["", "Model evaluations the references ran: " + ", ".join(f"{m} {n:,}" for m, n in evaluations.items())
                      + "."]
        same = res.get("greedy_lazy_same_order")
        if same:
            lines.append(f"The lazy greedy search removed the same experts in the same order as the exact one for all "
                         f"{same['removals']} removals." if same["first_difference"] is None else
                         f"The lazy greedy order first differs from the exact one at removal {same['first_difference'] + 1}"
                         f" of {same['removals']}.")
        if "wall_s" in res.get("cost", {}).get("floor", {}):
            lines += ["", "Search cost (each in its own process; peak resident memory includes the Python, torch and "
                      "transformers runtime):", "", "| method | wall s | x floor | peak RSS MB | x floor |", "|---|---|---|---|---|"]
            floor = res["cost"].get("floor", {})
            for method, cost in res["cost"].items():
                if "error" in cost and _refusal(res, method):  # the quality run refused it: the cost error is that
                    lines.append(f"| {method} | refused (see the quality table) | | | |")
                    continue
                if "error" in cost:
                    lines.append(f"| {method} | error: {cost['error'][:80]} | | | |")
                    continue
                lines.append(f"| {method} | {cost['wall_s']:.1f} | {cost['wall_s'] / floor['wall_s']:.2f} | "
                             f"{cost['peak_rss_mb']:.0f} | {cost['peak_rss_mb'] / floor['peak_rss_mb']:.2f} |")
        if res.get("decode", {}).get("full"):
            lines += ["", "Decode (greedy, tokens/s) and expert bytes, on this tiny model: overhead-bound (per-layer "
                      "Python work dominates), so it shows overhead, not what pruning or skipping saves at real "
                      "shapes (section Speed at real layer shapes):", "",
                      "| model | batch 1 | x full | batch 16 | x full | expert bytes |", "|---|---|---|---|---|---|"]
            base = res["decode"]["full"]
            for label, row in res["decode"].items():
                lines.append(f"| {label} | {row['batch_1']:.1f} | {row['batch_1'] / base['batch_1']:.3f} | "
                             f"{row['batch_16']:.1f} | {row['batch_16'] / base['batch_16']:.3f} | {row['expert_bytes']:,} |")
        lines.append("")
    lines += comparison_section(results)
    lines += recovery_section(results)
    lines += targets_section(results)
    lines += ["What was tried to make DiEP stronger, with what it gave: [TUNING.md](TUNING.md).", ""]
    previous = (out / "RESULTS.md").read_text() if (out / "RESULTS.md").is_file() else ""
    # the summary stays on top; the sections of benchmarks.serving (another venv), .speed and .search_cost are kept
    today = today_section(previous)
    if today:
        lines[1:1] = ["", today]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n" + kept_sections(previous))


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model_name, res in results["models"].items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, task in zip(axes, ("kit_wikitext2", "kit_blimp")):
            for method, by_sparsity in res["quality"].items():
                xs, ys = [0.0], [res["full"].get(task)]
                for sparsity, entries in sorted(by_sparsity.items(), key=lambda kv: float(kv[0])):
                    summary = _summary(entries, task)
                    if summary:
                        xs.append(float(sparsity))
                        ys.append(summary[0])
                if len(xs) > 1:
                    ax.plot(xs, ys, marker="o", label=method)
            ax.set_xlabel("expert sparsity")
            ax.set_ylabel(f"{task} {HEADLINE[task]}")
            if task in LOWER_IS_BETTER:
                ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(model_name)
        fig.tight_layout()
        fig.savefig(out / f"quality_vs_sparsity_{model_name}.png", dpi=100)
        plt.close(fig)


