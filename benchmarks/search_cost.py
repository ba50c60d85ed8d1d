"""How the DiEP search's cost grows with the model: wall time and peak memory against a forward+backward floor.

    python -m benchmarks.search_cost                      # four Mixtral-shaped sizes: RESULTS.md section "search_cost"
    python -m benchmarks.search_cost --sizes 128x2,256x2  # a quick look
    python -m benchmarks.search_cost --device cuda --sizes 256x4,1024x4,2048x4   # on a GPU: section "search_cost_cuda"

For each size (``<hidden>x<decoder layers>``, Mixtral proportions: expert intermediate 3.5 x hidden, 8 experts,
top-2; random weights, which do not change the cost) it runs, each in a fresh process so that peak memory is its
own, on the same random token batches for the same epochs:

- ``floor``: one plain forward + backward per batch of the frozen model (one trainable scalar on the input
  embeddings, so the backward crosses every layer, as DiEP's does);
- ``diep``: the DiEP search through Lightning (teacher pass, student pass with alpha/beta, backward, alternating
  optimizers; the teacher cache on, as by default).

It reports wall time, peak memory (resident on CPU; the CUDA allocator's peak on a GPU), the teacher cache's size, fits ``cost = a * params^b`` over the sizes,
and projects the search's time and memory to Mixtral-8x7B and Qwen3-30B-A3B (see :func:`projection`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import RESULTS, Parser, save_json, whole
from benchmarks.sections import publish, write_section
from benchmarks.speed import _sync

REPO = Path(__file__).resolve().parents[1]

#: Real models the cost is projected to: total parameters, decoder layers, hidden size, and the paper's
#: calibration set (128 sequences of 2048 tokens, bf16).
TARGETS = {
    "Mixtral-8x7B": {"params": 46.7e9, "active": 12.9e9, "layers": 32, "hidden": 4096,
                     "config": "configs/mixtral_8x7b.yaml"},
    "Qwen3-30B-A3B": {"params": 30.5e9, "active": 3.3e9, "layers": 48, "hidden": 2048,
                      "config": "configs/qwen3_30b_a3b.yaml"},
}


def config_for(hidden: int, layers: int, vocab: int) -> Any:
    from transformers import AutoConfig

    head_dim = 128 if hidden >= 512 else max(8, min(64, hidden // 4))
    return AutoConfig.for_model("mixtral", vocab_size=vocab, hidden_size=hidden, intermediate_size=int(3.5 * hidden),
                                num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2,
                                num_attention_heads=hidden // head_dim, num_key_value_heads=max(1, hidden // head_dim // 4),
                                head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False)


def random_batches(vocab: int, samples: int, seq_len: int, batch: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (samples, seq_len), generator=gen)
    return [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch]),
             "sample_index": torch.arange(i, min(i + batch, samples))} for i in range(0, samples, batch)]


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


def floor(model_dir: str, batches: list[dict[str, torch.Tensor]], epochs: int, device: torch.device) -> dict[str, float]:
    from diep_lightning.loading import load_model

    model = load_model(model_dir).to(device)
    model.requires_grad_(False)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    scale = torch.nn.Parameter(torch.ones((), device=device))
    optimizer = torch.optim.Adam([scale], lr=5e-3)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out * scale)
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in batches:
            optimizer.zero_grad()
            model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss.backward()
            optimizer.step()
    _sync(device)
    handle.remove()
    return {"loop_s": time.perf_counter() - start}


def diep(model_dir: str, batches: list[dict[str, torch.Tensor]], epochs: int, device: torch.device) -> dict[str, float]:
    import lightning.pytorch as pl

    from diep_lightning.methods import DiEPModule
    from diep_lightning.summary import quiet

    class LoopTime(pl.Callback):
        """The training loop's time alone: from the first epoch's start to the last one's end (no set-up)."""

        def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if trainer.current_epoch == 0:
                _sync(device)
                self.start = time.perf_counter()

        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            _sync(device)
            self.seconds = time.perf_counter() - self.start

    quiet()
    module = DiEPModule(model_dir)
    loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False)
    loop = LoopTime()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[loop])
    trainer.fit(module, train_dataloaders=loader)
    cache = sum(t.numel() * t.element_size() for row in module._teacher_cache.values() for t in row.values())
    return {"teacher_cache_mb": cache / 2**20, "loop_s": loop.seconds}


def child(kind: str, model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    """Body of one measured process. Both kinds import the same runtime (torch, transformers, Lightning, this
    package) before the clock starts, so import time and the runtime's memory weigh the same on both sides."""
    import lightning.pytorch  # noqa: F401

    import diep_lightning.methods  # noqa: F401
    from benchmarks.run import peak_rss_mb

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    batches = random_batches(vocab, args.samples, args.seq_len, args.batch_size)
    start = time.perf_counter()
    extra = (floor if kind == "floor" else diep)(model_dir, batches, args.epochs, device)
    _sync(device)
    if device.type == "cuda":
        extra["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), **extra}


def run_child(kind: str, model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.search_cost", "--child", kind, "--model-dir", model_dir,
           "--epochs", str(args.epochs), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} on {model_dir} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_key(results: dict[str, Any]) -> str:
    """The peak memory a run is judged on: the GPU's where it ran on one (what limits a user there), else resident."""
    return "peak_cuda_mb" if results.get("device") == "cuda" else "peak_rss_mb"


def summarise(row: dict[str, Any], memory: str = "peak_rss_mb") -> dict[str, Any]:
    """Medians over the rounds for each kind, and the search/floor ratios taken within each round (median, min,
    max), so that a slow moment of the machine shows as spread instead of as a ratio."""
    runs = row["runs"]
    for kind, measured in runs.items():
        row[kind] = {key: statistics.median(r[key] for r in measured) for key in measured[0]}
    for key, name in (("wall_s", "wall_ratio"), (memory, "memory_ratio"), ("loop_s", "loop_ratio")):
        if any(key not in r for r in runs["floor"] + runs["diep"]):  # runs saved before loop times were kept
            continue
        ratios = [d[key] / f[key] for f, d in zip(runs["floor"], runs["diep"])]
        row[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return row


def fit_power(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a * x^b`` in log-log space: (a, b)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    return math.exp(my - b * mx), b


def growth(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """``cost = a * params^b`` fitted over the sizes for the floor's and the search's time and the search's memory."""
    rows, params = results["rows"], [r["params"] for r in results["rows"]]
    if len(rows) < 2:
        return {}
    return {"floor_time": fit_power(params, [r["floor"]["wall_s"] for r in rows]),
            "diep_time": fit_power(params, [r["diep"]["wall_s"] for r in rows]),
            "diep_memory": fit_power(params, [r["diep"][memory_key(results)] for r in rows])}


#: assumptions of the projection's host-to-device copy estimate: pageable host memory to one accelerator, and the
#: accelerator's sustained bf16 throughput (40% of an A100's 312 TFLOP/s dense)
HOST_TO_DEVICE_GBPS = 10.0
ACCELERATOR_TFLOPS = 125.0


def projection(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Project the search to the real models with their shipped configs, on paper.

    Time: both the search and the floor are dominated by the active experts' matmuls, so the measured
    search/floor ratio at the largest size (where fixed per-run overhead weighs least) carries over; the floor itself is 3 forward-equivalents of the
    active parameters per token (forward, and a backward that computes input gradients only: the weights are
    frozen), i.e. ``6 * active * tokens`` FLOPs per epoch. Memory: the frozen bf16 weights (2 bytes/param) plus,
    for the search, the teacher cache ``layers * samples_per_rank * seq_len * hidden * 2`` bytes per rank, kept
    where the config says (``teacher_cache_device``) when it is within the config's ``teacher_cache_gb``; a cache
    over that limit is off and every step recomputes the teacher (ratio 4/3). A cache in host memory is copied to
    the accelerator every step: that copy's time (at :data:`HOST_TO_DEVICE_GBPS`) over the step's floor compute
    (at :data:`ACCELERATOR_TFLOPS`) is added to the ratio, as if nothing overlapped it."""
    import yaml

    ratio = max(rows, key=lambda r: r.get("params", 0))["wall_ratio"]["median"]  # the largest size: least overhead
    out = {}
    for name, t in TARGETS.items():
        config = yaml.safe_load((REPO / t["config"]).read_text())
        ranks, samples, seq_len = config["trainer"]["devices"], config["data"]["num_samples"], config["data"]["seq_len"]
        model = config["model"].get("init_args", config["model"])
        limit = model.get("teacher_cache_gb", 2.0)
        cache_gb = t["layers"] * math.ceil(samples / ranks) * seq_len * t["hidden"] * 2 / 2**30
        flops = 6 * t["active"] * samples * seq_len * config["trainer"].get("max_epochs", 10)
        used = cache_gb <= limit
        device = model.get("teacher_cache_device", "model")
        per_step = math.ceil(config["data"]["batch_size"] / ranks)  # samples per rank and step
        copy_gb = t["layers"] * per_step * seq_len * t["hidden"] * 2 / 2**30 if used and device == "cpu" else 0.0
        step_s = 6 * t["active"] * per_step * seq_len / (ACCELERATOR_TFLOPS * 1e12)
        copy_share = copy_gb * 2**30 / (HOST_TO_DEVICE_GBPS * 1e9) / step_s
        out[name] = {"config": t["config"], "ranks": ranks, "floor_pflop": flops / 1e15,
                     "search_over_floor": (ratio + copy_share) if used else 4 / 3, "measured_ratio": ratio,
                     "copy_gb_per_step": copy_gb, "copy_share": copy_share, "weights_gb": t["params"] * 2 / 2**30,
                     "teacher_cache_gb": cache_gb, "cache_limit_gb": limit, "cache_device": device, "cache_used": used}
    return out


def section_name(results: dict[str, Any]) -> str:
    return "search_cost" + ("_cuda" if results.get("device") == "cuda" else "")


def report(results: dict[str, Any]) -> str:
    memory = memory_key(results)
    loops = all("loop_ratio" in r for r in results["rows"])
    where = ((" (cuda)", "; peak memory is the CUDA allocator's peak (fp32 weights)") if memory == "peak_cuda_mb"
             else ("", ""))
    lines = [f"## Search cost against model size{where[0]}", "",
             f"Measured by: `{results['command']}` on {results['machine']}. Mixtral-shaped random models; "
             f"{results['samples']} sequences of {results['seq_len']} tokens, batch {results['batch_size']}, "
             f"{results['epochs']} epochs; each run in its own process, {results['repeats']} round(s) of floor and search "
             f"(alternating which goes first): medians, and the ratio's median [min-max] over the rounds{where[1]}."
             + (" Loop x floor: the same ratio for the training loops alone (first epoch's start to the end), without "
                "process start-up, model loading and Lightning's set-up." if loops else ""), "",
             "| size (hidden x layers) | parameters | floor s | DiEP s | x floor | " + ("loop x floor | " if loops else "")
             + "floor peak MB | DiEP peak MB | x floor | teacher cache MB |", "|---|---|---|---|---|---|---|---|---|"
             + ("---|" if loops else "")]
    for r in results["rows"]:
        f, d, w, m = r["floor"], r["diep"], r["wall_ratio"], r["memory_ratio"]
        loop = f"{r['loop_ratio']['median']:.2f} [{r['loop_ratio']['min']:.2f}-{r['loop_ratio']['max']:.2f}] | " if loops else ""
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {f['wall_s']:.1f} | {d['wall_s']:.1f} | "
                     f"{w['median']:.2f} [{w['min']:.2f}-{w['max']:.2f}] | {loop}{f[memory]:.0f} | "
                     f"{d[memory]:.0f} | {m['median']:.2f} [{m['min']:.2f}-{m['max']:.2f}] | "
                     f"{d['teacher_cache_mb']:.1f} |")
    targets = json.loads((Path(__file__).resolve().parent / "targets.json").read_text())
    for key, ratio, what in (("search_wall_ratio_max", "wall_ratio", "wall time"),
                             ("search_memory_ratio_max", "memory_ratio", "peak memory")):
        missed = [r["size"] for r in results["rows"] if r[ratio]["median"] > targets[key]]
        lines.append(f"\nTarget: the search within {targets[key]:g}x the floor's {what} at every size: "
                     + (f"missed at {', '.join(missed)}." if missed else "met."))
    fit = results["fit"]
    if fit:
        lines += ["", f"Fitted growth over {results['rows'][0]['params'] / 1e6:.1f}M-{results['rows'][-1]['params'] / 1e6:.0f}M "
                  f"parameters: floor time ~ params^{fit['floor_time'][1]:.2f}, DiEP time ~ params^{fit['diep_time'][1]:.2f}, "
                  f"DiEP peak memory ~ params^{fit['diep_memory'][1]:.2f}."]
    lines += ["",
              "Projected on paper with the shipped configs (see `projection` in `benchmarks/search_cost.py`; 128 x 2048 "
              "calibration tokens, 10 epochs, bf16; search / floor is the ratio measured above at the largest size plus the "
              f"per-step copy of a host-memory cache to the accelerator at {HOST_TO_DEVICE_GBPS:g} GB/s against the "
              f"step's floor compute at {ACCELERATOR_TFLOPS:g} TFLOP/s, not overlapped; 4/3 when the cache is off):", "",
              "| model (config) | ranks | floor compute (PFLOP) | search / floor time | of which cache copy | weights GB "
              "| teacher cache GB per rank | cache kept | cache used |", "|---|---|---|---|---|---|---|---|---|"]
    for name, p in results["projection"].items():
        lines.append(f"| {name} (`{p['config']}`) | {p['ranks']} | {p['floor_pflop']:.1f} | {p['search_over_floor']:.2f} "
                     f"| {p['copy_share']:.2f} ({p['copy_gb_per_step']:.1f} GB per step) | {p['weights_gb']:.0f} | "
                     f"{p['teacher_cache_gb']:.1f} | {p['cache_device']}, limit {p['cache_limit_gb']:g} GB | "
                     f"{'yes' if p['cache_used'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.search_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128x2,256x4,512x4,1024x4")
    ap.add_argument("--vocab", type=whole(64), default=2048)
    ap.add_argument("--samples", type=whole(1), default=16)
    ap.add_argument("--seq-len", type=whole(2), default=128)
    ap.add_argument("--batch-size", type=whole(1), default=4)
    ap.add_argument("--epochs", type=whole(1), default=5)
    ap.add_argument("--threads", type=whole(1), default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=whole(1), default=3, help="rounds of floor and search per size")
    ap.add_argument("--out", default=None,
                    help="where the run's JSON goes (default benchmarks/results/search_cost.json, search_cost_cuda.json on cuda)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    ap.add_argument("--child", choices=["floor", "diep"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--from", dest="from_json", default=None,
                    help="re-render the RESULTS.md section from an earlier run's json (projection recomputed from the "
                         "shipped configs), measuring nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        results = ap.earlier_run(args.from_json)
        results.setdefault("repeats", 1)
        for row in results["rows"]:
            if "runs" not in row:  # a run of one round per size
                row["runs"] = {"floor": [row["floor"]], "diep": [row["diep"]]}
            summarise(row, memory_key(results))
        results["fit"] = growth(results)  # a run cut short leaves its rows only
        results["projection"] = projection(results["rows"], args)
        if ap.report_file(args.results):
            write_section(Path(args.results), section_name(results), report(results))
        return results
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args)))
        return {}
    try:
        sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes: expected comma-separated HIDDENxLAYERS (128x2), got {args.sizes!r}")
    if any(len(size) != 2 or min(size) < 1 for size in sizes):
        ap.error(f"--sizes: each HIDDENxLAYERS needs two whole numbers >= 1, got {args.sizes!r}")
    ap.device(args.device)
    if args.out is None:  # a GPU's run never replaces the CPU's
        args.out = str(RESULTS / f"{section_name({'device': args.device})}.json")
    ap.out_file(args.out)
    ap.report_file(args.results)
    from benchmarks.speed import machine

    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.search_cost",
                                                           *(argv if argv is not None else sys.argv[1:])]),
                               "machine": machine(torch.device(args.device)), "device": args.device,
                               "samples": args.samples,
                               "seq_len": args.seq_len, "batch_size": args.batch_size, "epochs": args.epochs,
                               "repeats": args.repeats,
                               "rows": []}
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        for hidden, layers in sizes:
            size = f"{hidden}x{layers}"
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config_for(hidden, layers, args.vocab), dtype=torch.float32)
            params = sum(p.numel() for p in model.parameters())
            model_dir = str(Path(tmp) / size)
            model.save_pretrained(model_dir)
            del model
            row = {"size": size, "params": params, "runs": {"floor": [], "diep": []}}
            for round_ in range(args.repeats):  # one floor and one search per round, in alternating order
                for kind in ("floor", "diep") if round_ % 2 == 0 else ("diep", "floor"):
                    row["runs"][kind].append(run_child(kind, model_dir, args))
                    print(f"   {size} ({params / 1e6:.1f}M) round {round_} {kind}: {row['runs'][kind][-1]}", flush=True)
            results["rows"].append(summarise(row, memory_key(results)))
            save_json(args.out, results)  # each size as it finishes
    results["fit"] = growth(results)
    results["projection"] = projection(results["rows"], args)
    save_json(args.out, results)
    publish(args.results, section_name(results), report(results))
    return results


if __name__ == "__main__":
    main()
