"""Time of an expert's matmuls against the rows they multiply, with the weights read from memory (not cache).

Skipping a slot removes a row from its expert's matmul. Where reading the expert's weights bounds the matmul, its
time is flat in rows, and at batch 16 (every expert used by some token) skipping saves almost nothing; where the
kernel's time grows with rows, skipped rows pay. This tells which case a machine and dtype are in, through the
kernels the experts forward uses (every expert given the same rows): ``grouped``, torch's grouped matmul (eager), and
``loop``, transformers' per-expert ``mm`` fallback (what a compiled step runs for weights other than bf16).

    python -m benchmarks.expert_matmul                       # Mixtral-like experts, fp32 and bf16, CPU
    python -m benchmarks.expert_matmul --device cuda --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import RESULTS, Parser, save_json, whole
from benchmarks.sections import publish
from benchmarks.speed import SHAPES, _sync, machine, round_seeds

REPO = Path(__file__).resolve().parent.parent


def expert_shapes(shape: str, hidden: int | None = None) -> tuple[int, int, int]:
    """(experts, hidden, expert intermediate) of a benchmarks.speed shape; ``hidden`` scales both widths."""
    spec = SHAPES[shape]
    n = spec.get("num_local_experts", spec.get("num_experts"))
    h, i = spec["hidden_size"], spec.get("moe_intermediate_size", spec["intermediate_size"])
    if hidden is not None:
        i, h = max(8, i * hidden // h), hidden
    return n, h, i


def pool(n: int, h: int, i: int, dtype: torch.dtype, device: torch.device, pool_mb: int) -> list[tuple[Any, Any]]:
    """Enough layers of fused gate-up (n, 2i, h) and down (n, h, i) expert weights to fill ``pool_mb``, so that
    cycling through them reads each from memory, as a decode step over many layers does."""
    per_layer = 3 * n * h * i * torch.tensor([], dtype=dtype).element_size()
    layers = max(2, -(-pool_mb * 2**20 // per_layer))
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they live: no host copy of the pool
    return [(torch.randn(n, 2 * i, h, generator=gen, device=device, dtype=dtype),
             torch.randn(n, h, i, generator=gen, device=device, dtype=dtype)) for _ in range(layers)]


def _matmul(kernel: str) -> Any:
    """(input, weight (n, out, in), offsets) -> output through ``kernel``: torch's grouped matmul, as transformers'
    ``_grouped_linear`` calls it, or transformers' per-expert mm fallback."""
    from transformers.integrations import moe

    if kernel == "grouped":
        return lambda x, w, offs: moe._grouped_linear(x, w, offs)
    return lambda x, w, offs: torch.ops.transformers.grouped_mm_fallback(x, w.transpose(-2, -1), offs=offs)


@torch.no_grad()
def time_rows(weights: list[tuple[Any, Any]], rows: int, device: torch.device, repeats: int,
              kernel: str = "grouped") -> float:
    """Median over ``repeats`` sweeps of the seconds per expert matrix (gate-up and down, one expert) when every
    expert multiplies ``rows`` rows, each sweep one grouped matmul pair per layer of the pool."""
    linear = _matmul(kernel)
    n, two_i, h = weights[0][0].shape
    dtype = weights[0][0].dtype
    offs = torch.arange(1, n + 1, device=device, dtype=torch.int32) * rows
    x = torch.randn(n * rows, h, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def sweep() -> float:
        _sync(device)
        start = time.perf_counter()
        for gate_up, down in weights:
            y = linear(x, gate_up, offs)
            linear(y[:, : two_i // 2].contiguous(), down, offs)
        _sync(device)
        return (time.perf_counter() - start) / (len(weights) * n)

    sweep()  # first call: kernel choice and allocation
    return statistics.median(sweep() for _ in range(repeats))


@torch.no_grad()
def routed_rows(shape: str, hidden: int | None, batch: int, seeds: tuple[int, ...],
                new_tokens: int = 32) -> dict[str, dict[str, int]]:
    """How many rows each expert gets in the decode steps of benchmarks.speed's random model of ``shape`` (4 layers,
    skipping calibrated by the paper's rule), without and with skipping: ``{"off"|"on": {rows: count of (layer,
    step, expert)}}``, over greedy decodes of the prompts of ``seeds``."""
    import contextlib

    from benchmarks import speed
    from diep_lightning.families import get_family
    from diep_lightning.skipping import calibrate_skipping, skip_mask

    model = speed.build(shape, 4, 2048, torch.float32, hidden=hidden)
    calibrate_skipping(model, speed.calibration(2048))
    histograms: dict[str, dict[str, int]] = {"off": {}, "on": {}}
    setting = ["off"]

    def pre(module: Any, args: Any) -> None:
        idx, w = args[1], args[2]
        if args[0].shape[0] != batch:  # the prompt's prefill
            return
        if setting[0] == "on":
            idx = idx[~skip_mask(module.diep_skip, idx, w)]
        for rows in torch.bincount(idx.flatten(), minlength=module.num_experts).tolist():
            histograms[setting[0]][str(rows)] = histograms[setting[0]].get(str(rows), 0) + 1

    handles = [b.experts.register_forward_pre_hook(pre) for b in get_family(model).blocks(model)]
    try:
        for name in ("off", "on"):
            setting[0] = name
            with model.diep_skipping.disabled() if name == "off" else contextlib.nullcontext():
                for seed in seeds:
                    prompt = speed.prompt_ids(model.config.vocab_size, batch, 8, seed)
                    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    return histograms


def matmul_seconds(seconds: dict[str, float], rows: int) -> float:
    """An expert's matmul time at ``rows`` from the measured curve: 0 for an unused expert, linear between measured
    rows, extended by the last segment's slope past the largest."""
    xs = sorted(int(r) for r in seconds)
    ys = [seconds[str(r)] for r in xs]
    if rows == 0:
        return 0.0
    if rows <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if rows <= x1:
            return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
    return ys[-1] + slope * (rows - xs[-1])


def predicted_gain(seconds: dict[str, float], histograms: dict[str, dict[str, int]]) -> float:
    """The experts' matmul time without skipping over that with it, if each expert's matmul cost what the curve says
    for the rows it got."""
    total = {name: sum(count * matmul_seconds(seconds, int(rows)) for rows, count in hist.items())
             for name, hist in histograms.items()}
    return total["off"] / total["on"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    n, h, i = expert_shapes(args.shape, args.hidden)
    shown = args.argv if args.argv is not None else sys.argv[1:]
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.expert_matmul", *shown]),
                               "machine": machine(device), "device": device.type, "shape": args.shape,
                               "experts": n, "hidden": h, "intermediate": i, "pool_mb": args.pool_mb,
                               "repeats": args.repeats, "runs": {}}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        weights = pool(n, h, i, dtype, device, args.pool_mb)
        matrix_bytes = 3 * h * i * torch.tensor([], dtype=dtype).element_size()
        for kernel in args.kernels:
            seconds = {r: time_rows(weights, r, device, args.repeats, kernel) for r in args.rows}
            results["runs"][f"{dtype_name} {kernel}"] = {"matrix_bytes": matrix_bytes, "layers": len(weights),
                                                         "seconds": {str(r): s for r, s in seconds.items()}}
            print(f"== {dtype_name} {kernel}: " + ", ".join(f"{r} rows {s * 1e3:.3f} ms" for r, s in seconds.items()),
                  flush=True)
        del weights
    if args.predict:
        results["routing"] = {f"batch_{b}": routed_rows(args.shape, args.hidden, b, round_seeds(5))
                              for b in (1, 16)}
    return results


def rows_note(run: dict[str, Any]) -> str:
    """Whether the matmul time grows with rows from 1 to 4 (where batch 16 puts about 4 rows on each of 8 experts)."""
    seconds = {int(r): s for r, s in run["seconds"].items()}
    if 1 not in seconds or 4 not in seconds:
        return ""
    growth = seconds[4] / seconds[1]
    if growth < 1.15:
        return (f"4 rows take {growth:.2f}x one row's time: reading the weights bounds the matmul, so skipping rows of "
                "an expert some token still uses saves little")
    return (f"4 rows take {growth:.2f}x one row's time: the kernel's time grows with rows, so skipped rows pay even "
            "where every expert is still used")


def report(results: dict[str, Any]) -> str:
    rows = sorted({int(r) for run in results["runs"].values() for r in run["seconds"]})
    lines = [f"## Expert matmul time against rows ({results['device']})", "",
             f"Measured by: `{results['command']}` on {results['machine']}. {results['shape'].capitalize()}-like "
             f"experts ({results['experts']} x hidden {results['hidden']}, intermediate {results['intermediate']}), "
             f"the experts forward's matmuls (gate-up, then down; kernel grouped: torch's grouped matmul, loop: "
             f"transformers' per-expert mm fallback, what a compiled step runs for weights other than bf16) with "
             f"every expert given the same rows, over "
             f"a {results['pool_mb']} MB pool of layers so that the weights come from memory; median of "
             f"{results['repeats']} sweeps. Per expert: milliseconds, weight GB/s (its matrices' bytes over the "
             "time), and the time relative to one row.", "",
             "| dtype, kernel | " + " | ".join(f"{r} row" + "s" * (r > 1) for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for key, run in results["runs"].items():
        one = run["seconds"].get("1")
        cells = []
        for r in rows:
            s = run["seconds"].get(str(r))
            cells.append("-" if s is None else f"{s * 1e3:.3f} ms, {run['matrix_bytes'] / s / 1e9:.1f} GB/s"
                         + (f", {s / one:.2f}x" if one else ""))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    notes = [f"- {key}: {rows_note(run)}." for key, run in results["runs"].items() if rows_note(run)]
    lines += [""] + notes if notes else []
    routing = results.get("routing")
    if routing:
        lines += ["", f"What that predicts for skipping: the rows each expert gets in the decode steps of the "
                  f"{results['shape'].capitalize()}-like random model of `benchmarks.speed` (4 layers, skipping "
                  "calibrated by the paper's rule, greedy decode of 32 tokens from 5 prompts per batch size), costed "
                  "with the curve above; the experts' matmul time without skipping over that with skipping (the "
                  "whole step gains less: attention, routing and the rest stay).", "",
                  "| dtype, kernel | " + " | ".join(f"batch {b.split('_')[1]}" for b in routing) + " |",
                  "|---|" + "---|" * len(routing)]
        for key, run in results["runs"].items():
            lines.append(f"| {key} | " + " | ".join(f"{predicted_gain(run['seconds'], hist):.2f}x"
                                                    for hist in routing.values()) + " |")
        used = []
        for batch, hist in routing.items():
            shares = {name: 1 - h.get("0", 0) / sum(h.values()) for name, h in hist.items()}
            used.append(f"batch {batch.split('_')[1]} {shares['off']:.2f} -> {shares['on']:.2f}")
        lines += ["", "Share of (layer, step, expert) matrices some token used, without -> with skipping: "
                  + "; ".join(used) + "."]
    return "\n".join(lines) + "\n"


def section_name(results: dict[str, Any]) -> str:
    return "expert_matmul" + ("" if results["device"] == "cpu" else "_" + results["device"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.expert_matmul", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,16", help="comma-separated rows per expert")
    ap.add_argument("--kernels", default="grouped,loop", help="comma-separated: grouped, loop")
    ap.add_argument("--hidden", type=whole(64, 64), default=None, help="scale the widths to this hidden size (quick checks)")
    ap.add_argument("--pool-mb", type=whole(1), default=1536, help="weights cycled through (larger than the caches)")
    ap.add_argument("--repeats", type=whole(1), default=5)
    ap.add_argument("--no-predict", dest="predict", action="store_false",
                    help="leave out the prediction from benchmarks.speed's routing (builds and decodes its model)")
    ap.add_argument("--threads", type=whole(1), default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="the run's JSON (default benchmarks/results/<section>.json)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"),
                    help="RESULTS.md to put the section into ('' for none)")
    ap.add_argument("--from", dest="from_json", default=None,
                    help="render the RESULTS.md section from an earlier run's JSON, measuring nothing")
    args = ap.parse_args(argv)
    args.argv = argv
    ap.report_file(args.results)
    if args.from_json:
        results = ap.earlier_run(args.from_json)
    else:
        try:
            args.rows = [int(r) for r in args.rows.split(",")]
        except ValueError:
            ap.error(f"--rows: expected comma-separated whole numbers, got {args.rows!r}")
        if not args.rows or min(args.rows) < 1:
            ap.error(f"--rows: each must be >= 1, got {args.rows}")
        args.dtypes = [d for d in args.dtypes.split(",") if d]
        bad = [d for d in args.dtypes if d not in ("float32", "bfloat16", "float16")]
        if bad or not args.dtypes:
            ap.error(f"--dtypes: choose from float32, bfloat16, float16; got {bad or args.dtypes}")
        args.kernels = [k for k in args.kernels.split(",") if k]
        if not args.kernels or not set(args.kernels) <= {"grouped", "loop"}:
            ap.error(f"--kernels: choose from grouped, loop; got {args.kernels}")
        ap.device(args.device)
        out = ap.out_file(args.out or str(RESULTS /
                                          f"{section_name({'device': torch.device(args.device).type})}.json"))
        if args.threads:
            torch.set_num_threads(args.threads)
        results = run(args)
        save_json(out, results)
    publish(args.results, section_name(results), report(results))
    return results


if __name__ == "__main__":
    main()
