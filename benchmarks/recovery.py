"""The benchmark report's router-calibration section: each calibrated row against the same pruning without
calibration, and DiEP + calibration against every method without it, document by document."""

from __future__ import annotations

from typing import Any

from benchmarks.rows import CALIBRATED_BASE, CALIBRATED_ROWS
#: gap recovered at 50% sparsity the issue asks of DiEP + calibration: fine-grained models / top-2 models
RECOVERY_TARGET = {"fine": 0.5, "top2": 0.3}


def calibration_text(cal_row: str, entries: list[dict]) -> str:
    """What the row calibrated on: the default (text sampled from the model) where its entries record it; the
    rows measured before that default record no text and used the search's C4 text."""
    if cal_row == "diep_domain_cal":
        return "WikiText-2 validation"
    recorded = {tuple(e["router_calibration"].get("sources") or ()) for e in entries if "router_calibration" in e}
    return "generated" if recorded == {("generated",)} else "the search's C4 text"


def _config_top_k(name: str) -> int | None:
    """Top-k of a shipped model, for results recorded before runs stored it."""
    import json
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "models" / name / "config.json"
    return json.loads(config.read_text()).get("num_experts_per_tok") if config.is_file() else None


def _same_seeds(base: list[dict], calibrated: list[dict]) -> list[dict]:
    """The base row's entries for the seeds the calibrated row ran (DiEP's seeds), so the pairing is exact."""
    seeds = {e.get("seed") for e in calibrated}
    chosen = [e for e in base if e.get("seed") in seeds]
    return chosen or base


def _paired(run: Any, a: list[dict], b: list[dict], task: str) -> tuple[float, float, float, str] | None:
    docs_a, docs_b = run._documents(a, task), run._documents(b, task)
    if docs_a is None or docs_b is None or len(docs_a) != len(docs_b):
        return None
    point, low, high = run.paired_bootstrap(docs_a, docs_b, task)
    return point, low, high, run.verdict(task, low, high)


def _cell(task: str, said: tuple[float, float, float, str] | None, lower: set[str]) -> str:
    if said is None:
        return "n/a"
    point, low, high, verdict = said
    scale = 1 if task in lower else 100
    return f"{point * scale:.3g} [{low * scale:.3g}, {high * scale:.3g}] {verdict}"


def recovery_section(results: dict[str, Any]) -> list[str]:
    from benchmarks import report as run  # the report's statistics (imported here: it imports this module)

    rows = [(name, res) for name, res in results["models"].items()
            if any(row in res.get("quality", {}) for row in CALIBRATED_ROWS)]
    if not rows:
        return []
    lines = ["## Router calibration: what it gives back", "",
             "Each `<method>_cal` row is the same pruning followed by `RouterCalibration`'s defaults (routers trained "
             "to match the full model's next-token distribution on the calibration text, held-out early stopping). "
             "Gap recovered: (pruned - calibrated) / (pruned - full) of WikiText-2 word perplexity, text the "
             "calibration never saw. The method column names the calibration text: `generated` (the default: "
             "sequences sampled from the full model before removal), `the search's C4 text` (the earlier default; "
             "rows that record no text were measured with it), `WikiText-2 validation` (DiEP's plan calibrated on "
             "the evaluation's own domain, its test articles unseen, as a user who calibrates on the text they "
             "serve). Verdicts: 95% paired bootstrap over "
             "articles / pairs, calibrated against uncalibrated (perplexity ratio < 1 and BLiMP points > 0 are "
             "better).", "",
             "| model | sparsity | method | perplexity x full: pruned -> calibrated | gap recovered | perplexity ratio "
             "[95%] | BLiMP points [95%] | held-out KL | stage s |", "|---|---|---|---|---|---|---|---|---|"]
    checks: list[str] = []
    for name, res in rows:
        full, quality = res["full"], res["quality"]
        top_k = res.get("top_k") or _config_top_k(name)
        for cal_row in CALIBRATED_ROWS:
            base_row = CALIBRATED_BASE.get(cal_row, cal_row.removesuffix("_cal"))
            for sparsity, cal in sorted(quality.get(cal_row, {}).items(), key=lambda kv: float(kv[0])):
                base = _same_seeds(quality.get(base_row, {}).get(sparsity, []), cal)
                if not cal or "refused" in cal[0] or not base or "refused" in base[0] or not full.get("kit_wikitext2"):
                    continue
                p_base = run._summary(base, "kit_wikitext2")[0]
                p_cal = run._summary(cal, "kit_wikitext2")[0]
                gap = (p_base - p_cal) / (p_base - full["kit_wikitext2"]) if p_base != full["kit_wikitext2"] else 0.0
                ppl = _paired(run, cal, base, "kit_wikitext2")
                blimp = _paired(run, cal, base, "kit_blimp")
                kl = [e["router_calibration"] for e in cal if "router_calibration" in e]
                kl_cell = (f"{sum(r['heldout_kl_before'] for r in kl) / len(kl):.4f} -> "
                           f"{sum(r['heldout_kl_after'] for r in kl) / len(kl):.4f}" if kl else "n/a")
                secs = f"{sum(r['seconds'] for r in kl) / len(kl):.0f}" if kl else "n/a"
                label = f"{base_row} ({calibration_text(cal_row, cal)})"
                lines.append(f"| {name} | {float(sparsity):.0%} | {label} | {p_base / full['kit_wikitext2']:.3f} -> "
                             f"{p_cal / full['kit_wikitext2']:.3f} | {gap:.0%} | "
                             f"{_cell('kit_wikitext2', ppl, run.LOWER_IS_BETTER)} | "
                             f"{_cell('kit_blimp', blimp, run.LOWER_IS_BETTER)} | {kl_cell} | {secs} |")
                if cal_row == "diep_domain_cal" and float(sparsity) >= 0.5:
                    want = RECOVERY_TARGET["fine" if (top_k or 2) > 2 else "top2"]
                    checks.append(f"- {name} {float(sparsity):.0%}: calibrated on the evaluation domain's validation "
                                  f"text, DiEP + calibration recovers {gap:.0%} of the gap on its unseen test articles "
                                  f"(target >= {want:.0%} {'met' if gap >= want else 'missed'} in-domain).")
                if cal_row == "diep_cal":
                    if float(sparsity) >= 0.5:
                        want = RECOVERY_TARGET["fine" if (top_k or 2) > 2 else "top2"]
                        checks.append(f"- {name} {float(sparsity):.0%}: DiEP + calibration recovers {gap:.0%} of the "
                                      f"perplexity gap (target >= {want:.0%}: {'met' if gap >= want else 'missed'}).")
                    else:
                        worse = ppl is not None and ppl[3] == "worse"
                        checks.append(f"- {name} {float(sparsity):.0%}: calibration against plain DiEP on perplexity: "
                                      f"{ppl[3] if ppl else 'n/a'} (target: never worse beyond noise: "
                                      f"{'missed' if worse else 'met'}).")
                    if blimp is not None:
                        checks.append(f"- {name} {float(sparsity):.0%}: BLiMP with calibration against without: "
                                      f"{blimp[3]} (target: never worse beyond noise: "
                                      f"{'missed' if blimp[3] == 'worse' else 'met'}).")
        for sparsity, cal in quality.get("diep_cal", {}).items():
            if float(sparsity) < 0.5 or not cal or "refused" in cal[0]:
                continue
            verdicts = {}
            for peer, entries in quality.items():
                if peer in CALIBRATED_ROWS or peer in ("diep_skip",):
                    continue
                peer_entries = entries.get(sparsity, [])
                if not peer_entries or "refused" in peer_entries[0]:
                    continue
                said = _paired(run, cal, _same_seeds(peer_entries, cal) if peer == "diep" else peer_entries,
                               "kit_wikitext2")
                if said is not None:
                    verdicts[peer] = said[3]
            if verdicts:
                beaten = [p for p, v in verdicts.items() if v == "better"]
                rest = [f"{p} ({v})" for p, v in verdicts.items() if v != "better"]
                checks.append(f"- {name} {float(sparsity):.0%}: DiEP + calibration is better beyond noise on perplexity "
                              f"than {', '.join(beaten) or 'none'}" + (f"; not beyond noise: {', '.join(rest)}"
                                                                       if rest else " (every method without it)") + ".")
        cost = res.get("cost", {})
        stage, search = cost.get("diep_cal", {}), cost.get("diep", {})
        if "wall_s" in stage and "wall_s" in search:
            wall, mem = stage["wall_s"] / search["wall_s"], stage["peak_rss_mb"] / search["peak_rss_mb"]
            checks.append(f"- {name}: the calibration stage takes {wall:.2f}x the DiEP search's wall time (target <= 1: "
                          f"{'met' if wall <= 1 else 'missed'}) and {mem:.2f}x its peak memory (target <= 1.2: "
                          f"{'met' if mem <= 1.2 else 'missed'}).")
    return lines + [""] + checks + [""]
