"""Time of one layer's CKA matrix (skipping's and merging's expert similarity) at the real models' shapes.

The token-Gram form that :func:`diep_lightning.calibration.cka_matrix` picks against the feature form it replaced
for these shapes (every pair of experts' (H, H) products). At 128 experts the feature form is too slow to run in
full: it is timed over the pairs of ``--feature-experts`` experts and scaled to all pairs (its time is one product
per pair), which the report says.

    python -m benchmarks.cka_cost                      # mixtral-8x7b and qwen3-30b-a3b, 4096 tokens (the default)
    python -m benchmarks.cka_cost --tokens 512 --feature-experts 0   # both forms in full
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import RESULTS, Parser, save_json, whole
from benchmarks.expert_matmul import expert_shapes
from benchmarks.sections import publish
from benchmarks.speed import FULL_WIDTH, SHAPES, machine


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure(name: str, tokens: int, feature_experts: int) -> dict[str, Any]:
    """Both forms' time on random (E, T, H) outputs; the feature form over a subset of experts when asked."""
    from diep_lightning.calibration import _cka_features, cka_matrix

    n, h, _ = expert_shapes(name)
    outputs = torch.randn(n, tokens, h, generator=torch.Generator().manual_seed(0))
    gram_s, cka = timed(cka_matrix, outputs)
    subset = n if feature_experts <= 0 or feature_experts >= n else feature_experts
    feature_s, part = timed(_cka_features, outputs[:subset])
    pairs = lambda e: e * (e + 1) // 2  # noqa: E731 - the products the feature form computes
    return {"experts": n, "hidden": h, "tokens": tokens, "token_gram_s": gram_s,
            "feature_s": feature_s * pairs(n) / pairs(subset), "feature_experts_timed": subset,
            "max_difference": float((cka[:subset, :subset] - part).abs().max())}


def report(results: dict[str, Any]) -> str:
    lines = ["## CKA calibration cost at the real models' shapes", "",
             f"Measured by: `{results['command']}` on {results['machine']}. One layer's pairwise linear CKA of the "
             "experts' outputs on the calibration tokens (SkipCalibration's gamma and ExpertMerging's similarity), "
             "random outputs of the real models' expert count and width: the token-Gram form `cka_matrix` uses "
             "against the feature form (each pair's (H, H) product) it replaced. Where fewer experts were timed "
             "in the feature form, its time is scaled to all pairs.", "",
             "| shape | experts | hidden | tokens | token-Gram form | feature form | x faster | largest difference |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        timed_note = "" if r["feature_experts_timed"] == r["experts"] else \
            f" (from {r['feature_experts_timed']} experts' pairs)"
        lines.append(f"| {name} | {r['experts']} | {r['hidden']} | {r['tokens']} | {r['token_gram_s']:.1f} s | "
                     f"{r['feature_s']:.1f} s{timed_note} | {r['feature_s'] / r['token_gram_s']:.0f}x | "
                     f"{r['max_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.cka_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(FULL_WIDTH), help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--tokens", type=whole(2), default=4096, help="calibration tokens per layer (SkipCalibration's default)")
    ap.add_argument("--feature-experts", type=whole(0), default=8,
                    help="experts whose pairs the feature form is timed over (0: all of them)")
    ap.add_argument("--threads", type=whole(1), default=None)
    ap.add_argument("--out", default=str(RESULTS / "cka_cost.json"))
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"),
                    help="RESULTS.md to put the section into ('' for none)")
    ap.add_argument("--from", dest="from_json", default=None, help="re-render from an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        results = ap.earlier_run(args.from_json)
        publish(ap.report_file(args.results), "cka_cost", report(results))
        return results
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    ap.out_file(args.out)
    ap.report_file(args.results)
    if args.threads:
        torch.set_num_threads(args.threads)
    shown = argv if argv is not None else sys.argv[1:]
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.cka_cost", *shown]),
                               "machine": machine(torch.device("cpu")), "runs": {}}
    for name in args.shapes.split(","):
        results["runs"][name] = measure(name, args.tokens, args.feature_experts)
        print(name, results["runs"][name], flush=True)
        save_json(args.out, results)
    publish(args.results, "cka_cost", report(results))
    return results


if __name__ == "__main__":
    main()
