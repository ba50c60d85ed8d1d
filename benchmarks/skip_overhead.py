"""What skipping costs where a decode step is bound by per-operation overhead (as a GPU's eager decode is by kernel
launches): the lean grouped_mm path against the stock experts forward with sentinel ids, both against no skipping.

    python -m benchmarks.skip_overhead                     # the shipped models: RESULTS.md section "skip_overhead"
    python -m benchmarks.skip_overhead --models models/tiny-mixtral --rounds 3 --results ''   # a quick look
    python -m benchmarks.skip_overhead --models mixtral,qwen3 --rounds 5   # benchmarks.speed's real layer shapes
    python -m benchmarks.skip_overhead --models mixtral,qwen3 --compile    # the decode step compiled, as servers run it

Per model: skipping calibrated with the paper's rule on calibration text; then, in each round, greedy decode with
skipping off, on through the lean path and on through the sentinel path, one after another in the same process
(each ratio is to that round's run without skipping). Also the ATen operations each MoE layer adds per decode step
(counted with a dispatch mode: on a GPU, each is a kernel launch).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.files import RESULTS, Parser, save_json, whole
from benchmarks.sections import publish
from benchmarks import speed
from benchmarks.speed import machine, ratios

REPO = Path(__file__).resolve().parents[1]
PATHS = ("off", "lean", "sentinel")


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched (each a kernel launch on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


class _Path:
    """Skipping off, on (lean), or on through the stock sentinel path, for one model."""

    def __init__(self, model: Any, name: str) -> None:
        self.model, self.name = model, name

    def __enter__(self) -> None:
        self.model.diep_skipping.lean = self.name != "sentinel"
        self.model.diep_skipping.enabled = self.name != "off"

    def __exit__(self, *exc: Any) -> None:
        self.model.diep_skipping.lean = self.model.diep_skipping.enabled = True


def calibration_batches(vocab: int, tokens: int = 4096) -> list[dict[str, torch.Tensor]]:
    """Fixed random ids: what is timed is the cost per operation, which the text does not change."""
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, vocab, (4, tokens // 4), generator=gen)}]


def decode_tps(model: Any, batch: int, new_tokens: int, args: argparse.Namespace) -> float:
    return speed.decode_tps(model, batch, new_tokens, torch.device(args.device), prompt_len=16, compiled=args.compile)


@torch.no_grad()
def ops_per_layer(model: Any, layers: int) -> dict[str, float]:
    """ATen operations one decode step adds per MoE layer over no skipping, for each skipping path."""
    device = next(model.parameters()).device
    prompt = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4)).to(device)
    out = model(prompt, use_cache=True)
    step = torch.randint(3, model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(5)).to(device)
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name goes in 5.40)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {name: out["cache"] if "cache" in out else out.past_key_values}
    counts = {}
    for name in PATHS:
        with _Path(model, name), OpCounter() as counter:
            model(step, use_cache=True, **cache)
        counts[name] = counter.ops
    return {name: (counts[name] - counts["off"]) / layers for name in PATHS if name != "off"}


def load(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A shipped model's folder, or a shape name of ``benchmarks.speed`` (random weights, 4 layers)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.speed import SHAPES, build

    if model in SHAPES:
        return build(model, layers=4, vocab=2048, dtype=dtype).to(device)
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval().to(device)


def run_model(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    from diep_lightning.families import get_family
    from diep_lightning.skipping import calibrate_skipping

    model = load(model_dir, getattr(torch, args.dtype), args.device)
    counters.clear()  # the compiled graphs and breaks of this model alone
    skipping = calibrate_skipping(model, calibration_batches(model.config.vocab_size))
    layers = len(get_family(model).blocks(model))
    paths = args.paths
    for batch in (1, 16):  # warm-up: first calls pay allocation (and compile: the same lengths as timed)
        for name in paths:
            with _Path(model, name):
                decode_tps(model, batch, args.new_tokens if args.compile else 4, args)
    times: dict[str, dict[str, list[float]]] = {name: {"batch_1": [], "batch_16": []} for name in paths}
    for r in range(args.rounds):
        order = paths[r % len(paths):] + paths[:r % len(paths)]  # each round starts from another path
        for batch in (1, 16):
            for name in order:
                with _Path(model, name):
                    times[name][f"batch_{batch}"].append(decode_tps(model, batch, args.new_tokens, args))
        print(f"   round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {times[n]['batch_1'][-1]:.0f}/{times[n]['batch_16'][-1]:.0f}" for n in paths), flush=True)
    shares = list(skipping.skipped_fraction.values())
    decoded = {f"batch_{b}": speed.decode_skipped_share(model, b, args.new_tokens, torch.device(args.device), 16)
               for b in (1, 16)}
    compiled = {}
    if args.compile:  # that the timed steps ran compiled graphs, whole
        compiled = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
    return {"skipped_share": sum(shares) / len(shares), "decode_skipped_share": decoded, "moe_layers": layers,
            "ops_per_layer": ops_per_layer(model, layers),
            **compiled,
            "summary": {n: {m: ratios(v, times["off"][m]) for m, v in per.items()} for n, per in times.items()}}


def _shapes(results: dict[str, Any]) -> bool:
    """Whether a run timed benchmarks.speed's real layer shapes (not shipped models)."""
    return any(name in speed.SHAPES for name in results["models"])


def report(results: dict[str, Any]) -> str:
    dtype = results.get("dtype", "float32")
    if _shapes(results):
        title, what = ("Skipping's cost at real layer shapes, lean and sentinel paths side by side",
                       f"Random-weight models of benchmarks.speed's shapes (4 decoder layers, {dtype})")
    else:
        title, what = ("Skipping's cost where decoding is overhead-bound",
                       "The shipped tiny models (a decode step is per-operation overhead, as a GPU's eager decode is "
                       f"kernel launches; {dtype})")
    if results.get("compiled"):
        title += ", decode step compiled"
        what += (", the decode step compiled (torch.compile, fullgraph, static cache; one graph per skipping path and "
                 "batch, compiled in the warm-up), as a server's compiled step or CUDA graphs run it")
    lines = [f"## {title}", "",
             f"Measured by: `{results['command']}` on {results['machine']}. {what}, skipping calibrated with the paper's "
             f"rule; greedy decode of {results['new_tokens']} tokens"
             + (" (tokens/s of the decode steps, the prompt's prefill left out)" if results.get("decode_steps_only")
                else "") + f", {results['rounds']} rounds, each timing skipping "
             "off, on (lean grouped_mm path) and on through the stock experts forward with sentinel ids one after "
             "another (each round starting from another); ratios to the same round's run without skipping: median "
             "[min-max]. Skipped share: of the chosen slots, on the calibration tokens (in brackets, where measured: "
             "in the timed decode steps at batch 1 / 16). Operations: ATen operations a decode step adds per MoE "
             "layer over no skipping.", "",
             "| model | skipped share | lean b1 | lean b16 | sentinel b1 | sentinel b16 | operations lean / sentinel |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results["models"].items():
        s = res["summary"]

        def cell(path: str, metric: str) -> str:
            if path not in s:
                return "not timed"
            r = s[path][metric]
            return f"{r['ratio']:.2f}x [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"

        ops = res["ops_per_layer"]
        decoded = res.get("decode_skipped_share")
        share = f"{res['skipped_share']:.2f}" + (f" ({decoded['batch_1']:.2f} / {decoded['batch_16']:.2f})"
                                                 if decoded else "")
        lines.append(f"| {name} | {share} | {cell('lean', 'batch_1')} | {cell('lean', 'batch_16')} | "
                     f"{cell('sentinel', 'batch_1')} | {cell('sentinel', 'batch_16')} | "
                     f"{ops['lean']:.0f} / {ops['sentinel']:.0f} |")
    if results.get("compiled"):
        lines += ["", "Compiled: " + "; ".join(f"{name} {res['graphs']} graphs, {res['graph_breaks']} graph breaks"
                                               for name, res in results["models"].items()) + "."]
    return "\n".join(lines) + "\n"


def section_name(results: dict[str, Any]) -> str:
    """RESULTS.md section (and default JSON name) of a run: one per kind of model, device, dtype and compilation."""
    device, dtype = results.get("device", "cpu"), results.get("dtype", "float32")
    return ("skip_overhead" + ("_shapes" if _shapes(results) else "") + ("" if device == "cpu" else "_" + device)
            + ("" if dtype == "float32" else "_" + dtype) + ("_compiled" if results.get("compiled") else ""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.skip_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="models/tiny-mixtral,models/tiny-qwen-moe,models/tiny-mixtral-deep,"
                                        "models/tiny-qwen3-deep",
                    help="comma-separated model folders, or shapes of benchmarks.speed (mixtral, qwen3)")
    ap.add_argument("--rounds", type=whole(1), default=7)
    ap.add_argument("--new-tokens", type=whole(2), default=32)
    ap.add_argument("--threads", type=whole(1), default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--paths", default=",".join(PATHS),
                    help="comma-separated skipping paths to time (off always; fewer: fewer graphs to compile)")
    ap.add_argument("--compile", action="store_true",
                    help="decode through a compiled step (static cache); writes its own RESULTS.md section")
    ap.add_argument("--out", default=None, help="where the run's JSON goes (default benchmarks/results/skip_overhead*.json, "
                                                "named like the RESULTS.md section)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"),
                    help="RESULTS.md to put the section into ('' for none)")
    ap.add_argument("--from", dest="from_json", default=None,
                    help="render the RESULTS.md section from an earlier run's JSON (a GPU's, say), measuring nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        results = ap.earlier_run(args.from_json)
        publish(ap.report_file(args.results), section_name(results), report(results))
        return results
    args.paths = tuple(dict.fromkeys(["off"] + [x for x in args.paths.split(",") if x]))
    if not set(args.paths) <= set(PATHS) or len(args.paths) < 2:
        ap.error(f"--paths: choose from {', '.join(PATHS)} (off is always timed), got {args.paths!r}")
    models = [m for m in args.models.split(",") if m]
    missing = [m for m in models if m not in speed.SHAPES and not (Path(m) / "config.json").is_file()]
    if missing:
        ap.error(f"--models: no model (config.json) at {', '.join(missing)}; or a shape of {', '.join(speed.SHAPES)}")
    ap.device(args.device)
    torch.set_num_threads(args.threads)
    if args.compile:
        speed.compile_decoding()
    shown = argv if argv is not None else sys.argv[1:]
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.skip_overhead", *shown]),
                               "machine": machine(torch.device(args.device)), "rounds": args.rounds,
                               "new_tokens": args.new_tokens, "dtype": args.dtype, "compiled": args.compile,
                               "device": torch.device(args.device).type, "decode_steps_only": True,
                               "models": {}}
    section = section_name({**results, "models": {Path(m).name: None for m in models}})
    if args.out is None:
        args.out = str(RESULTS / f"{section}.json")
    ap.out_file(args.out)
    ap.report_file(args.results)
    for model_dir in models:
        print(f"== {model_dir}", flush=True)
        results["models"][Path(model_dir).name] = run_model(model_dir, args)
        save_json(args.out, results)
    publish(args.results, section, report(results))
    return results


if __name__ == "__main__":
    main()
