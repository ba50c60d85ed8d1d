"""Skipping's strength against quality: how much more skipping the trained shipped models take before BLiMP drops.

    python -m benchmarks.skip_strength                       # RESULTS.md section "skip_strength"
    python -m benchmarks.skip_strength --models models/tiny-mixtral --strengths 1,2 --blimp-limit 10   # a quick look

The paper's median rule skips about half of the non-top choices (a quarter of the slots at top-2), which bounds
what skipping can save (section "Speed at real layer shapes"). ``SkipCalibration(strength=s)`` multiplies every
threshold by s. Here each shipped model is pruned exactly as the benchmark's ``diep_skip`` row (DiEP's seed-0
scores from ``benchmarks/results/run.json``, global, 25% and 50%), and skipping is calibrated at each strength on the
same calibration batches; BLiMP and WikiText-2 of the pruned model with skipping are compared with the same model
without it, document by document (95% paired-bootstrap intervals). Each model runs in its own process
(``--jobs``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import RESULTS, Parser, run_json, save_json, whole
from benchmarks.run import HEADLINE, LOWER_IS_BETTER, REPO, _datamodule, paired_bootstrap
from benchmarks.sections import write_section

TASKS = ["kit_wikitext2", "kit_blimp"]


def evaluate(model: Any, model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Headline metric and each document's value per task."""
    from transformers import AutoTokenizer

    from diep_lightning.evaluation import evaluate as kit_evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out: dict[str, Any] = {"per_document": {}}
    for task, limit in (("kit_wikitext2", args.wikitext_limit), ("kit_blimp", args.blimp_limit)):
        raw = kit_evaluate(model, tokenizer=tokenizer, tasks=[task], limit=limit, batch_size=32, per_document=True)
        out[task] = raw[f"{task}/{HEADLINE[task]}"]
        out["per_document"][task] = raw["per_document"][task][HEADLINE[task]]
    return out


def run_model(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Per sparsity: the pruned model without skipping, and per strength its skipped share and quality."""
    from diep_lightning.data import first_batches
    from diep_lightning.loading import load_model
    from diep_lightning.pipeline import prune
    from diep_lightning.skipping import calibrate_skipping

    name = Path(model_dir).name
    saved = json.loads(Path(args.scores_from).read_text())["models"][name]["diep_scores_seed0"]
    scores = [torch.tensor(s) for s in saved]
    batches = first_batches(_datamodule(model_dir, args, 42), 4)  # the diep_skip row's calibration batches
    result: dict[str, Any] = {}
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        model = prune(load_model(model_dir), scores, sparsity, "global").model.eval()
        entry = {"off": evaluate(model, model_dir, args), "strengths": {}}
        for strength in [float(s) for s in args.strengths.split(",")]:
            skipping = calibrate_skipping(model, batches, strength=strength)
            shares = list(skipping.skipped_fraction.values())
            entry["strengths"][str(strength)] = {"skipped_share": sum(shares) / len(shares),
                                                 **evaluate(model, model_dir, args)}
            skipping.hooks.remove()
            del model.diep_skipping
            print(f"   {name} {sparsity:.2f} strength {strength:g}: share {sum(shares) / len(shares):.3f}, "
                  f"BLiMP {entry['strengths'][str(strength)]['kit_blimp']:.4f} (off {entry['off']['kit_blimp']:.4f})",
                  flush=True)
        result[str(sparsity)] = entry
    return result


def report(results: dict[str, Any]) -> str:
    lines = ["## Skipping strength against quality", "",
             f"Measured by: `{results['command']}`. Each shipped model pruned as the `diep_skip` row (DiEP seed 0, "
             "global), skipping calibrated at each strength (thresholds x strength; 1 is the paper's median rule) on "
             f"the same calibration batches; {results['blimp_limit']} pairs per BLiMP paradigm, "
             f"{results['wikitext_limit']} WikiText-2 articles. BLiMP lost: accuracy without skipping minus with, in "
             "points, with its 95% paired-bootstrap interval; perplexity: with skipping / without.", "",
             "| model | sparsity | strength | skipped share | BLiMP lost, points [95%] | WikiText-2 x [95%] |",
             "|---|---|---|---|---|---|"]
    worst: dict[str, tuple[float, float, str]] = {}  # strength -> (points lost, its interval's low end, where)
    ppl: dict[str, tuple[float, str]] = {}
    for model, by_sparsity in results["models"].items():
        for sparsity, entry in by_sparsity.items():
            off = entry["off"]
            where = f"{model} {float(sparsity):.0%}"
            for strength, on in entry["strengths"].items():
                cells = []
                for task in TASKS:
                    a, b = off["per_document"][task], on["per_document"][task]
                    if task in LOWER_IS_BETTER:
                        point, low, high = paired_bootstrap(b, a, task)
                        cells.append(f"{point:.3f} [{low:.3f}, {high:.3f}]")
                        if point > ppl.get(strength, (0.0, ""))[0]:
                            ppl[strength] = (point, where)
                    else:
                        point, low, high = (100 * v for v in paired_bootstrap(a, b, task))
                        cells.append(f"{point:+.1f} [{low:+.1f}, {high:+.1f}]")
                        if strength not in worst or point > worst[strength][0]:
                            worst[strength] = (point, low, where)
                lines.append(f"| {model} | {float(sparsity):.0%} | {float(strength):g} | {on['skipped_share']:.3f} | "
                             f"{cells[1]} | {cells[0]} |")
    limit = json.loads((Path(__file__).resolve().parent / "targets.json").read_text())["skipping_blimp_loss_points_max"]
    lines.append("")
    for strength, (point, low, where) in worst.items():
        verdict = "met" if point <= limit else ("missed, within noise of the target" if low <= limit else "missed")
        lines.append(f"- strength {float(strength):g}: BLiMP lost at most {point:+.2f} points ({where}; target <= "
                     f"{limit:g}: {verdict}); WikiText-2 perplexity at most x{ppl[strength][0]:.3f} "
                     f"({ppl[strength][1]}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.skip_strength", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="models/tiny-mixtral,models/tiny-qwen-moe,models/tiny-mixtral-deep,"
                                        "models/tiny-qwen3-deep")
    ap.add_argument("--sparsities", default="0.25,0.5")
    ap.add_argument("--strengths", default="1,1.25,1.5,2")
    ap.add_argument("--blimp-limit", type=whole(1), default=40)
    ap.add_argument("--wikitext-limit", type=whole(1), default=8)
    ap.add_argument("--num-samples", type=whole(1), default=128)
    ap.add_argument("--seq-len", type=whole(2), default=256)
    ap.add_argument("--batch-size", type=whole(1), default=16)
    ap.add_argument("--scores-from", default=str(run_json(REPO / "benchmarks")),
                    help="a benchmarks.run JSON (results/run.json) holding each model's DiEP seed-0 scores")
    ap.add_argument("--jobs", type=whole(1), default=2)
    ap.add_argument("--out", default=str(RESULTS / "skip_strength.json"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--from", dest="from_json", default=None,
                    help="re-render the RESULTS.md section from an earlier run's json, measuring nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.from_json:
        results = ap.earlier_run(args.from_json)
        if ap.report_file(args.results):
            write_section(Path(args.results), "skip_strength", report(results))
        return results
    strengths = args.strengths.split(",")
    if not all(s.replace(".", "", 1).isdigit() and float(s) > 0 for s in strengths):
        ap.error(f"--strengths: comma-separated numbers > 0, got {args.strengths!r}")
    models = [m for m in args.models.split(",") if m]
    scores = json.loads(Path(args.scores_from).read_text()).get("models", {}) if Path(args.scores_from).is_file() else {}
    missing = [m for m in models if "diep_scores_seed0" not in scores.get(Path(m).name, {})]
    if missing:
        ap.error(f"--scores-from: {args.scores_from} holds no DiEP seed-0 scores for {', '.join(missing)}")
    torch.set_num_threads(1)
    if not args.child:
        ap.out_file(args.out)
        ap.report_file(args.results)
    if args.child:
        Path(args.child).write_text(json.dumps(run_model(models[0], args)))
        return {}
    command = "python -m benchmarks.skip_strength" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {"command": command, "blimp_limit": args.blimp_limit,
                               "wikitext_limit": args.wikitext_limit, "models": {}}
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(models)
        running: list[tuple[str, subprocess.Popen, Path]] = []
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                model = pending.pop(0)
                out = Path(tmp) / f"{Path(model).name}.json"
                running.append((model, subprocess.Popen([sys.executable, "-m", "benchmarks.skip_strength", *passed,
                                                         "--models", model, "--child", str(out)], cwd=REPO), out))
            model, proc, out = running.pop(0)
            if proc.wait() != 0:
                raise SystemExit(f"benchmarks.skip_strength: {model} failed (exit {proc.returncode})")
            results["models"][Path(model).name] = json.loads(out.read_text())
    save_json(args.out, results)
    if args.results:
        write_section(Path(args.results), "skip_strength", report(results))
    print(report(results))
    return results


if __name__ == "__main__":
    main()
