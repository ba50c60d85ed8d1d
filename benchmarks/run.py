"""Benchmark: DiEP against the baselines on the shipped models, and what the search and the pruned model cost.

One command (from the repository root):

    python -m benchmarks.run                                  # the shipped models, writes benchmarks/RESULTS.md
    python -m benchmarks.run --models models/tiny-mixtral --limit 100 --seeds 0

For each model, method and sparsity (25%, 50%) it prunes with the method's scores, evaluates the pruned model
with the offline kit (WikiText-2 perplexity, BLiMP, ARC-Easy, PIQA, HellaSwag, COPA, LAMBADA) relative to the
full model, and records exported expert bytes. DiEP and random run over several seeds (DiEP: calibration data
seed). Then, side by side in one run, each method's search cost (wall time, peak resident memory, each in its
own subprocess) against the floor: one plain forward + backward of the same model over the same batches and
epochs. Finally decode tokens/s (greedy, batch 1 and 16) of the full, pruned, and pruned + skipping models.
Writes ``RESULTS.md`` and ``quality_vs_sparsity_<model>.png`` into ``--out`` and its JSON to ``<out>/results/run.json``; each model's
finished parts go to ``--out``/``.part_<model>/`` as they finish, so the same command with ``--resume`` goes on
after an interruption (the default run takes hours on a small CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import Parser, a_run_of, run_json
from benchmarks.report import (_documents, _summary, comparisons, machine, paired_bootstrap,  # noqa: F401
                               plot, targets_section, verdict, write_report)
from benchmarks.rows import (BASELINES, CALIBRATED_ROWS, COMPARED, COST_ROWS, DOMAIN_TEXT, HEADLINE,  # noqa: F401
                             LOWER_IS_BETTER, QUALITY_ROWS, TASKS)
from diep_lightning.outputs import is_report

REPO = Path(__file__).resolve().parents[1]



# ---------------------------------------------------------------------------------------------- searching
def domain_text() -> Path:
    """The evaluation domain's validation text (``diep_domain_cal``), next to the checkout's shared data."""
    return REPO.parent / "shared" / "data" / "train_corpus" / DOMAIN_TEXT


def _datamodule(model_dir: str, args: argparse.Namespace, seed: int):
    from diep_lightning.data import CalibrationDataModule

    return CalibrationDataModule(tokenizer=model_dir, num_samples=args.num_samples, seq_len=args.seq_len,
                                 batch_size=args.batch_size, seed=seed)


def search(model_dir: str, method: str, args: argparse.Namespace, data_seed: int = 42, random_seed: int = 0,
           **module_kwargs: Any):
    """Run a method's search (DiEPModule) or statistics pass (BaselineModule) and return the fitted module and its
    datamodule."""
    import lightning.pytorch as pl

    from diep_lightning.methods import BaselineModule, DiEPModule

    if method == "diep":
        module = DiEPModule(model_dir, **module_kwargs)
    else:
        module = BaselineModule(model_dir, method=method, random_seed=random_seed, **module_kwargs)
    datamodule = _datamodule(model_dir, args, data_seed)
    trainer = pl.Trainer(max_epochs=args.epochs if method == "diep" else 1, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule)
    return module, datamodule


def naee_keep(model_dir: str, sparsity: float) -> int:
    """Experts per layer a uniform pruning at ``sparsity`` keeps (NAEE's subset size)."""
    from diep_lightning.families import get_family
    from diep_lightning.loading import load_config

    n, _ = get_family(load_config(model_dir)).config_experts(load_config(model_dir))
    return n - round(sparsity * n)


def floor_pass(model_dir: str, args: argparse.Namespace) -> None:
    """The cost floor: one plain forward + backward per batch of the same frozen model, same batches and epochs.

    A single trainable scalar multiplies the input embeddings, so the backward traverses every layer as DiEP's
    does, but there is no teacher pass and no per-expert scaling."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.requires_grad_(False)
    scale = torch.nn.Parameter(torch.ones(()))
    optimizer = torch.optim.Adam([scale], lr=5e-3)
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, a, out: out * scale)
    datamodule = _datamodule(model_dir, args, 42)
    datamodule.setup("fit")
    for _ in range(args.epochs):
        for batch in datamodule.train_dataloader():
            optimizer.zero_grad()
            model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss.backward()
            optimizer.step()
    handle.remove()


def reference_kwargs(args: argparse.Namespace) -> dict[str, int]:
    """Evaluation size and limit of the references (ablation, greedy)."""
    return {"reference_tokens": args.reference_tokens, "max_evaluations": args.max_evaluations}


def cost_search(model_dir: str, row: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The method and search arguments behind a cost-table row, as the quality phase runs it at 50% sparsity."""
    if row == "reap_global_norm":
        return "reap", {"normalize": "layer"}
    if row == "naee":
        return "naee", {"naee_keep": naee_keep(model_dir, 0.5)}
    if row == "evo":
        return "evo", {"evo_sparsity": 0.5, "evo_population": args.evo_population,
                       "evo_generations": args.evo_generations, "reference_tokens": args.reference_tokens}
    if row in ("ablation", "greedy", "greedy_lazy"):
        greedy = {"greedy_until": 0.5, **({"greedy_lazy": True} if row == "greedy_lazy" else {})}
        return row.removesuffix("_lazy"), {**reference_kwargs(args), **(greedy if row != "ablation" else {})}
    return row, {}


def cost_child(model_dir: str, method: str, args: argparse.Namespace) -> dict[str, float]:
    """Body of a cost subprocess: time one method's search and report this process's peak RSS."""
    torch.manual_seed(0)
    start = time.perf_counter()
    if method == "floor":
        floor_pass(model_dir, args)
    elif method == "diep_cal":  # the router-calibration stage alone: its own wall time and peak memory
        import gc

        module, datamodule = search(model_dir, "diep", args)
        scores = module.expert_scores()
        del module
        gc.collect()
        reset_peak_rss()
        start = time.perf_counter()
        prune(model_dir, scores, 0.5, "global", datamodule, calibrate=True)
    elif method == "diep_evo":  # DiEP's search, then the evolutionary allocation over its ranking
        module, _ = search(model_dir, "diep", args)
        with tempfile.TemporaryDirectory() as tmp:
            recorded = Path(tmp) / "scores.json"
            recorded.write_text(json.dumps({"scores": [s.tolist() for s in module.expert_scores()]}))
            _, kwargs = cost_search(model_dir, "evo", args)
            module, _ = search(model_dir, "evo", args, evo_criterion="recorded", evo_scores_from=str(recorded),
                               **kwargs)
            module.expert_scores()
    else:
        name, kwargs = cost_search(model_dir, method, args)
        module, _ = search(model_dir, name, args, **kwargs)
        # refused here as in the quality phase, before the search's work
        if method in ("naee", "ablation", "greedy", "greedy_lazy", "evo"):
            module.check_pruning(0.5, "uniform" if method == "naee" else "global")
        module.expert_scores()  # NAEE's subset search, evo, ablation and greedy do their work at scoring
    wall = time.perf_counter() - start
    return {"wall_s": wall, "peak_rss_mb": peak_rss_mb()}


def reset_peak_rss() -> None:
    """Start this process's peak resident memory afresh (Linux: ``clear_refs`` 5), so a stage after a search
    reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that high-water mark
    across ``exec`` from the forking parent, so a child would report the benchmark driver's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_cost(model_dir: str, method: str, args: argparse.Namespace) -> dict[str, float]:
    """Run :func:`cost_child` in a fresh process (so peak memory is the method's own)."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--cost-child", method, "--models", model_dir,
           "--epochs", str(args.epochs), "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--evo-population", str(args.evo_population),
           "--evo-generations", str(args.evo_generations), "--reference-tokens", str(args.reference_tokens),
           "--max-evaluations", str(args.max_evaluations)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- pruning
def prune(model_dir: str, scores: list[torch.Tensor], sparsity: float, mode: str, datamodule: Any = None,
          merge: Any = False, skip: bool = False, calibrate: bool = False, router_data: Any = None):
    """A fresh copy of the model pruned with ``scores`` by the library's :func:`diep_lightning.prune`; with
    ``calibrate`` its routers are calibrated (default settings) on ``RouterCalibration``'s default text, as many
    sequences sampled from the model before pruning as the datamodule holds, or on all the calibration text of
    ``router_data`` (a datamodule, or "search": the datamodule's own)."""
    from diep_lightning.data import first_batches
    from diep_lightning.loading import load_model
    from diep_lightning.pipeline import prune as prune_model
    from diep_lightning.router_calibration import sample_sequences, start_token

    batches = first_batches(datamodule, 4) if datamodule is not None else []
    model = load_model(model_dir)
    if not calibrate:
        router_batches = ()
    elif router_data is None:  # the default: the model's own samples
        tokens = sample_sequences(model, datamodule.num_samples, datamodule.seq_len, start_token(model),
                                  seed=datamodule.seed)
        router_batches = [{"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}]
    else:
        router_batches = first_batches(datamodule if router_data == "search" else router_data, 10**9)
    pruned = prune_model(model, scores, sparsity, mode, batches=batches, merge=merge or None, skip=skip,
                         calibrate_router=calibrate or None, router_batches=router_batches)
    if calibrate:  # which text, as RouterCalibration records it
        pruned.plan.router_calibration["sources"] = (["generated"] if router_data is None else ["search"]
                                                     if router_data == "search" else list(router_data.sources))
    return pruned.model, pruned.plan, pruned.after, pruned.skipping


def headline(results: dict[str, Any]) -> dict[str, float]:
    """Each task's headline metric, and its standard error as ``<task>_stderr`` when lm-eval computed one."""
    out = {task: results.get(f"{task}/{metric}") for task, metric in HEADLINE.items() if f"{task}/{metric}" in results}
    for task, metric in HEADLINE.items():
        stderr = (results.get(task) or {}).get(f"{metric}_stderr")
        if task in out and isinstance(stderr, (int, float)):
            out[f"{task}_stderr"] = float(stderr)
    return out


def evaluate_model(model: Any, model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    from transformers import AutoTokenizer

    from diep_lightning.evaluation import evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limits = {"kit_wikitext2": args.wikitext_limit, "kit_blimp": args.blimp_limit}
    scores: dict[str, float] = {}
    for limit in sorted({limits.get(t, args.limit) for t in TASKS}, key=str):
        tasks = [t for t in TASKS if limits.get(t, args.limit) == limit]
        raw = evaluate(model, tokenizer=tokenizer, tasks=tasks, limit=limit, batch_size=32,
                       bootstrap_iters=args.bootstrap_iters, per_document=True)
        scores.update(headline(raw))
        for task in tasks:  # each document's headline metric, for the paired comparisons of the report
            scores.setdefault("per_document", {})[task] = raw["per_document"].get(task, {}).get(HEADLINE[task], [])
    return scores


# ---------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def decode_tps(model: Any, batch: int, new_tokens: int, prompt_len: int = 16, repeats: int = 3) -> float:
    """Greedy decode tokens/s (batch x new tokens / time), best of ``repeats``."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, model.config.vocab_size, (batch, prompt_len), generator=gen)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
        best = max(best, batch * new_tokens / (time.perf_counter() - start))
    return best


# ---------------------------------------------------------------------------------------------- the run
def checkpoint_sha256(model_dir: str) -> str | None:
    """SHA-256 of the model's ``model.safetensors``, so a report says which checkpoint it measured.

    The shipped models get retrained; without the fingerprint a stale report is indistinguishable from a
    fresh one. Returns ``None`` for a directory without that file (a sharded or remote model).
    """
    import hashlib

    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_model(model_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from diep_lightning.removal import size_report

    name = Path(model_dir).name
    print(f"== {name}", flush=True)
    full = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    result: dict[str, Any] = {"full": evaluate_model(full, model_dir, args) if "quality" in args.phases else {},
                              "full_sizes": size_report(full), "quality": {}, "cost": {}, "decode": {},
                              "checkpoint_sha256": checkpoint_sha256(model_dir), "machine": machine(args.threads),
                              "top_k": getattr(full.config, "num_experts_per_tok", None)}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    def record(method: str, sparsity: float, seed: int | None, model: Any, plan: Any, sizes: dict) -> None:
        scores = evaluate_model(model, model_dir, args)
        entry = result["quality"].setdefault(method, {}).setdefault(str(sparsity), [])
        entry.append({"seed": seed, "metrics": scores, "expert_bytes": sizes["expert_bytes"],
                      "kept_per_layer": [len(k) for k in plan.kept]})
        if plan.router_calibration:
            entry[-1]["router_calibration"] = {k: v for k, v in plan.router_calibration.items() if k != "history"}
        print(f"   {method:<14} sparsity {sparsity:.2f} seed {seed}: " +
              ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, (int, float))), flush=True)

    rows = set(args.methods.split(",")) if args.methods else set(QUALITY_ROWS)

    def wanted(*names: str) -> bool:
        return bool(rows.intersection(names))

    if "quality" in args.phases:
        # DiEP: one search per data seed serves every sparsity
        diep_modules = {}
        # (DiEP refined by the evolutionary allocation needs only the first seed's search)
        diep_rows = wanted("diep", "diep_uniform", "diep_cal")  # the other DiEP rows need only the first seed
        for seed in seeds if diep_rows else seeds[:1] if wanted("diep_evo", "diep_merge", "diep_merge_cal",
                                                                 "diep_skip", "diep_domain_cal",
                                                                 "diep_search_cal") else []:
            module, datamodule = search(model_dir, "diep", args, data_seed=42 + seed)
            diep_modules[seed] = (module.expert_scores(), datamodule)
            for sparsity in sparsities:
                if wanted("diep"):
                    model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "global")
                    record("diep", sparsity, seed, model, plan, sizes)
                if wanted("diep_cal"):
                    model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "global", datamodule,
                                                  calibrate=True)
                    record("diep_cal", sparsity, seed, model, plan, sizes)
                if seed == seeds[0] and wanted("diep_search_cal"):  # the search's own text (C4), one seed
                    model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "global", datamodule,
                                                  calibrate=True, router_data="search")
                    record("diep_search_cal", sparsity, seed, model, plan, sizes)
                if seed == seeds[0] and wanted("diep_uniform"):  # the uniform ablation: one seed
                    model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "uniform")
                    record("diep_uniform", sparsity, seed, model, plan, sizes)
        if diep_modules:
            scores0, dm0 = diep_modules[seeds[0]]
            result["diep_scores_seed0"] = [s.tolist() for s in scores0]
        for sparsity in sparsities if diep_modules else []:
            if wanted("diep_merge"):
                model, plan, sizes, _ = prune(model_dir, scores0, sparsity, "global", dm0, merge=True)
                record("diep_merge", sparsity, seeds[0], model, plan, sizes)
            if wanted("diep_merge_cal"):
                model, plan, sizes, _ = prune(model_dir, scores0, sparsity, "global", dm0, merge=True, calibrate=True)
                record("diep_merge_cal", sparsity, seeds[0], model, plan, sizes)
            if wanted("diep_skip"):
                model, plan, sizes, _ = prune(model_dir, scores0, sparsity, "global", dm0, skip=True)
                record("diep_skip", sparsity, seeds[0], model, plan, sizes)
            if wanted("diep_domain_cal") and not domain_text().is_file():
                result["quality"].setdefault("diep_domain_cal", {})[str(sparsity)] = [
                    {"refused": f"no evaluation-domain text at {domain_text()} (../shared/data next to the checkout)"}]
            elif wanted("diep_domain_cal"):
                from diep_lightning.data import CalibrationDataModule

                data = CalibrationDataModule(tokenizer=model_dir, sources=[str(domain_text())],
                                             num_samples=args.num_samples, seq_len=args.seq_len,
                                             batch_size=args.batch_size, seed=42)
                model, plan, sizes, _ = prune(model_dir, scores0, sparsity, "global", dm0, calibrate=True,
                                              router_data=data)
                record("diep_domain_cal", sparsity, seeds[0], model, plan, sizes)
        # DiEP's ranking within each layer, its allocation refined by the EvoESAP-style search
        for sparsity in sparsities if diep_modules and wanted("diep_evo") else []:
            with tempfile.TemporaryDirectory() as tmp:
                recorded = Path(tmp) / "scores.json"
                recorded.write_text(json.dumps({"scores": [s.tolist() for s in scores0]}))
                module, _ = search(model_dir, "evo", args, random_seed=seeds[0], evo_sparsity=sparsity,
                                   evo_criterion="recorded", evo_scores_from=str(recorded),
                                   evo_population=args.evo_population, evo_generations=args.evo_generations,
                                   reference_tokens=args.reference_tokens)
            module.check_pruning(sparsity, "global")
            model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "global")
            record("diep_evo", sparsity, seeds[0], model, plan, sizes)
        # baselines
        for seed in seeds if wanted("random") else []:
            module, _ = search(model_dir, "random", args, random_seed=seed)
            for sparsity in sparsities:
                model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "uniform")
                record("random", sparsity, seed, model, plan, sizes)
        for method in ("frequency", "reap"):
            if not wanted(method):
                continue
            module, _ = search(model_dir, method, args)
            for sparsity in sparsities:
                model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "uniform")
                record(method, sparsity, None, model, plan, sizes)
        # non-uniform peers: REAP normalised per layer and ranked globally (MoNE-style), the EvoESAP-style search
        if wanted("reap_global_norm", "reap_global_norm_cal"):
            module, dm = search(model_dir, "reap", args, normalize="layer")
            for sparsity in sparsities:
                for row, calibrate in (("reap_global_norm", False), ("reap_global_norm_cal", True)):
                    if wanted(row):
                        model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "global", dm,
                                                      calibrate=calibrate)
                        record(row, sparsity, None, model, plan, sizes)
        for sparsity in sparsities if wanted("evo", "evo_cal") else []:
            module, dm = search(model_dir, "evo", args, evo_sparsity=sparsity, evo_population=args.evo_population,
                                evo_generations=args.evo_generations, reference_tokens=args.reference_tokens)
            module.check_pruning(sparsity, "global")
            for row, calibrate in (("evo", False), ("evo_cal", True)):
                if wanted(row):
                    model, plan, sizes, _ = prune(model_dir, module.expert_scores(), sparsity, "global", dm,
                                                  calibrate=calibrate)
                    record(row, sparsity, None, model, plan, sizes)
        # references for the best achievable allocation (refused politely on models too large for them); the
        # lazy greedy search runs everywhere, and where the exact one runs too the two orders are compared
        orders = {}
        for method, kwargs in (("ablation", reference_kwargs(args)),
                               ("greedy", {"greedy_until": max(sparsities), **reference_kwargs(args)}),
                               ("greedy_lazy", {"greedy_until": max(sparsities), "greedy_lazy": True,
                                                **reference_kwargs(args)})):
            if not wanted(method, f"{method}_cal"):
                continue
            try:
                module, dm = search(model_dir, method.removesuffix("_lazy"), args, **kwargs)
                module.check_pruning(max(sparsities), "global")
                ref_scores = module.expert_scores()
            except ValueError as err:
                result["quality"][method] = {str(s): [{"refused": str(err)}] for s in sparsities}
                print(f"   {method} refused: {err}", flush=True)
                continue
            result.setdefault("reference_evaluations", {})[method] = module.scorer.evaluator.evaluations
            orders[method] = getattr(module.scorer, "order", None)
            for sparsity in sparsities:
                for row, calibrate in ((method, False), (f"{method}_cal", True)):
                    if wanted(row):
                        model, plan, sizes, _ = prune(model_dir, ref_scores, sparsity, "global", dm,
                                                      calibrate=calibrate)
                        record(row, sparsity, None, model, plan, sizes)
        if orders.get("greedy") and orders.get("greedy_lazy"):
            same = next((i for i, (a, b) in enumerate(zip(orders["greedy"], orders["greedy_lazy"])) if a != b), None)
            result["greedy_lazy_same_order"] = {"removals": len(orders["greedy"]),
                                                "first_difference": same}
        for sparsity in sparsities if wanted("naee") else []:
            try:
                module, _ = search(model_dir, "naee", args, naee_keep=naee_keep(model_dir, sparsity))
                module.check_pruning(sparsity, "uniform")
                naee_scores = module.expert_scores()
            except ValueError as err:
                result["quality"].setdefault("naee", {})[str(sparsity)] = [{"refused": str(err)}]
                print(f"   naee refused: {err}", flush=True)
                continue
            model, plan, sizes, _ = prune(model_dir, naee_scores, sparsity, "uniform")
            record("naee", sparsity, None, model, plan, sizes)
        if args.methods:
            result["rows"] = sorted(rows)
    if "cost" in args.phases or "decode" in args.phases:
        measure_cost_and_decode(model_dir, args, result, full)
    return result


def measure_cost_and_decode(model_dir: str, args: argparse.Namespace, result: dict[str, Any], full: Any) -> None:
    """Search cost (each method in its own subprocess) and decode speed, into ``result``.

    Timings are only comparable on an otherwise idle machine, so with ``--jobs`` the parallel quality runs finish
    first and this runs afterwards, one model at a time. DiEP's seed-0 scores come from the quality phase (or, if
    it was not run here, from a fresh seed-0 search)."""
    if "diep_scores_seed0" in result:
        scores0 = [torch.tensor(s) for s in result["diep_scores_seed0"]]
        dm0 = _datamodule(model_dir, args, 42)
        dm0.setup("fit")
    elif "decode" in args.phases:  # the decode variants prune with seed-0 DiEP scores
        module, dm0 = search(model_dir, "diep", args, data_seed=42)
        scores0 = module.expert_scores()
    if "cost" in args.phases:
        # the references (ablation, greedy) are yardsticks rather than methods to pick, but their cost is shown too
        # with --methods, the floor and those rows only (the floor is always measured beside them)
        chosen = set(args.methods.split(",")) if getattr(args, "methods", None) else set(COST_ROWS)
        for method in [row for row in COST_ROWS if row == "floor" or row in chosen]:
            result["cost"][method] = measure_cost(model_dir, method, args)
            print(f"   cost {method}: {result['cost'][method]}", flush=True)
    if "decode" in args.phases:  # full, pruned 50%, pruned 50% + skipping, and skipping alone
        from diep_lightning.removal import size_report

        torch.set_num_threads(args.threads)
        variants = {"full": full}
        variants["pruned_50"] = prune(model_dir, scores0, 0.5, "global")[0]
        variants["pruned_50_skip"] = prune(model_dir, scores0, 0.5, "global", dm0, skip=True)[0]
        from diep_lightning.data import first_batches
        from diep_lightning.skipping import calibrate_skipping

        skip_only = copy.deepcopy(full)
        calibrate_skipping(skip_only, first_batches(dm0, 4))
        variants["full_skip"] = skip_only
        for label, model in variants.items():
            result["decode"][label] = {f"batch_{b}": decode_tps(model, b, args.new_tokens) for b in (1, 16)}
            result["decode"][label]["expert_bytes"] = size_report(model)["expert_bytes"]
            print(f"   decode {label}: {result['decode'][label]}", flush=True)


#: arguments that do not change what a model's part measures, so a part can be resumed across them
PLACEMENT_ARGS = ("models", "out", "jobs", "combine", "resume", "phases", "cost_child")


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in PLACEMENT_ARGS}


def part_dir(out: Path, model_dir: str) -> Path:
    """Where a model's finished parts are kept, for ``--resume``."""
    return out / f".part_{Path(model_dir).name}"


#: each option's default, filled in by main(): an option added after a part was written counts as its default there
DEFAULTS: dict[str, Any] = {}


def finished_part(path: Path, args: argparse.Namespace, phases: list[str]) -> dict[str, Any] | None:
    """The results an earlier run with the same settings wrote to ``path`` for the same phases, or None: a part is
    written only once its model's phases are done, so one that exists is complete."""
    if not path.is_file():
        return None
    part = json.loads(path.read_text())
    theirs = _settings(part.get("args", {}))
    if part.get("args", {}).get("phases") != phases or any(
            theirs.get(key, DEFAULTS.get(key)) != value for key, value in _settings(vars(args)).items()):
        return None
    return part


def _parallel(models: list[str], argv: list[str], out: Path, jobs: int, args: argparse.Namespace,
              resumed: list[str]) -> dict[str, Any]:
    """Benchmark each model in its own process (``jobs`` at a time, largest checkpoint first so the long runs do
    not start last) and gather their results; with ``--resume``, a model whose part is finished is not rerun."""
    base = [a for a in argv]
    for flag in ("--models", "--jobs", "--out", "--phases", "--resume"):
        while flag in base:
            i = base.index(flag)
            del base[i:i + (1 if flag == "--resume" else 2)]
        base = [a for a in base if not a.startswith(flag + "=")]
    running: list[tuple[subprocess.Popen, Path]] = []
    gathered: dict[str, Any] = {}
    pending = []
    for model in sorted(models, key=lambda m: -sum(f.stat().st_size for f in Path(m).glob("*.safetensors"))):
        part = part_dir(out, model)
        done = finished_part(run_json(part), args, ["quality"]) if args.resume else None
        if done is not None:
            gathered.update(done["models"])
            resumed.append(f"{Path(model).name} quality")
        else:
            pending.append(model)
    while pending or running:
        while pending and len(running) < jobs:
            model = pending.pop(0)
            part = part_dir(out, model)
            part.mkdir(parents=True, exist_ok=True)
            run_json(part).unlink(missing_ok=True)  # the run's own earlier part: stale from here on
            log = open(part / "log.txt", "w")
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.run", *base, "--models", model,
                                     "--out", str(part), "--phases", "quality"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            running.append((proc, part))
        time.sleep(5)
        for proc, part in list(running):
            if proc.poll() is not None:
                running.remove((proc, part))
                if proc.returncode != 0:
                    raise RuntimeError(f"benchmark of {part.name} failed; see {part / 'log.txt'}")
                gathered.update(json.loads(run_json(part).read_text())["models"])
    return {Path(m).name: gathered[Path(m).name] for m in models}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = Parser("benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="models/tiny-mixtral,models/tiny-qwen-moe,models/tiny-mixtral-deep,"
                                            "models/tiny-qwen3-deep")
    parser.add_argument("--sparsities", default="0.25,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--limit", type=float, default=100, help="documents per multiple-choice task")
    parser.add_argument("--blimp-limit", type=int, default=40, help="pairs per BLiMP paradigm (34 paradigms)")
    parser.add_argument("--wikitext-limit", type=int, default=8, help="WikiText-2 test articles")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--bootstrap-iters", type=int, default=100,
                        help="lm-eval bootstrap iterations for the standard errors (0: none)")
    parser.add_argument("--evo-population", type=int, default=16)
    parser.add_argument("--evo-generations", type=int, default=20)
    parser.add_argument("--reference-tokens", type=int, default=4096,
                        help="calibration tokens each model evaluation of evo and the ablation and greedy references "
                             "runs over")
    parser.add_argument("--max-evaluations", type=int, default=5000,
                        help="the references are refused on models that would need more loss evaluations")
    parser.add_argument("--methods", default=None,
                        help="comma-separated quality rows to measure (default: all of "
                             f"{', '.join(QUALITY_ROWS)}); --combine adds such a run's rows to an earlier run's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks"))
    parser.add_argument("--jobs", type=int, default=1, help="models benchmarked in parallel processes")
    parser.add_argument("--combine", default=None,
                        help="comma-separated output folders of earlier per-model runs: merge them into one report "
                             "(a later folder's section replaces an earlier one's for the same model, except that a "
                             "run of only the timed phases adds its cost and decode tables to the quality run's)")
    parser.add_argument("--phases", default="quality,cost,decode",
                        help="comma-separated subset of quality,cost,decode; with --jobs > 1 the parallel runs do "
                             "quality only and cost and decode follow one model at a time, so timings see an idle machine")
    parser.add_argument("--resume", action="store_true",
                        help="reuse each model's parts (quality; cost and decode) that an earlier, interrupted run of "
                             "the same command finished in --out, so a long run can go on where it stopped")
    parser.add_argument("--cost-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    DEFAULTS.update({a.dest: a.default for a in parser._actions if a.dest != "help"})
    args.limit = int(args.limit) if args.limit >= 1 else args.limit
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - {"quality", "cost", "decode"})
    if unknown or not args.phases:
        parser.error(f"--phases: unknown phase(s) {unknown or '(none given)'}; choose from quality, cost, decode")
    if args.methods and set(args.methods.split(",")) - set(QUALITY_ROWS):
        parser.error(f"--methods: unknown row(s) {sorted(set(args.methods.split(',')) - set(QUALITY_ROWS))}; "
                     f"choose from {', '.join(QUALITY_ROWS)}")
    torch.set_num_threads(args.threads)
    from diep_lightning.summary import quiet

    quiet()  # the searches' logs then show what the CLI's would: no warnings that are the design
    if args.cost_child:
        print(json.dumps(cost_child(args.models.split(",")[0], args.cost_child, args)))
        return {}
    parts = [parser.earlier_run(str(run_json(d)), "--combine") for d in (args.combine or "").split(",") if d]
    out = parser.out_folder(args.out, {"RESULTS.md": is_report, "results/run.json": a_run_of("run")})
    run_json(out).parent.mkdir(parents=True, exist_ok=True)
    if args.combine:
        merged = {"args": parts[0]["args"], "models": {}}
        for part in parts:  # a later folder's section replaces an earlier one's for the same model
            for name, res in part["models"].items():
                # each section keeps the run that measured it: the runs may differ in seeds, threads or jobs
                by = res.get("measured_by", part["command"])
                earlier = merged["models"].get(name)
                if earlier is not None and res.get("rows") and earlier.get("quality"):
                    # a run of some quality rows (--methods) adds or replaces those rows in the earlier run's
                    earlier["quality"].update(res["quality"])
                    for key in ("reference_evaluations", "greedy_lazy_same_order"):
                        if key in res:
                            earlier[key] = {**earlier.get(key, {}), **res[key]} if key == "reference_evaluations" else res[key]
                    earlier["measured_by"] = f"{earlier['measured_by']} ; {by}"
                    continue
                if earlier is not None and not res.get("quality") and earlier.get("quality"):
                    # a run of the timed phases only (--phases cost,decode) adds its tables to the quality run's
                    earlier.update({k: v for k, v in res.items() if k in ("cost", "decode") and v})
                    earlier["measured_by"] = f"{earlier['measured_by']} ; {by}"
                    continue
                merged["models"][name] = {**res, "measured_by": by}
        merged["command"] = " ; ".join(dict.fromkeys(run for res in merged["models"].values()
                                                     for run in res["measured_by"].split(" ; ")))
        run_json(out).write_text(json.dumps(merged, indent=2))
        write_report(merged, argparse.Namespace(**parts[0]["args"]), out, merged["command"])
        plot(merged, out)
        return merged
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {"command": command, "args": vars(args), "models": {}, "resumed": []}
    models = args.models.split(",")

    def save_part(path: Path, phases: list[str], sections: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"command": command, "args": {**vars(args), "phases": phases}, "models": sections}))

    if args.jobs > 1 and len(models) > 1:
        results["models"] = _parallel(models, argv if argv is not None else sys.argv[1:], out, args.jobs, args,
                                      results["resumed"])
        timed = [p for p in args.phases if p != "quality"]
        if timed:  # now the machine is idle: one model at a time
            from transformers import AutoModelForCausalLM

            for model_dir in models:
                name = Path(model_dir).name
                done = finished_part(part_dir(out, model_dir) / "timed.json", args, timed) if args.resume else None
                if done is not None:
                    results["models"][name].update({k: done["models"][name][k] for k in ("cost", "decode")})
                    results["resumed"].append(f"{name} {' and '.join(timed)}")
                    continue
                full = AutoModelForCausalLM.from_pretrained(model_dir).eval()
                measure_cost_and_decode(model_dir, argparse.Namespace(**{**vars(args), "phases": timed}),
                                        results["models"][name], full)
                save_part(part_dir(out, model_dir) / "timed.json", timed,
                          {name: {k: results["models"][name][k] for k in ("cost", "decode")}})
    else:
        for model_dir in models:
            name = Path(model_dir).name
            done = finished_part(part_dir(out, model_dir) / "results.json", args, args.phases) if args.resume else None
            if done is not None:
                results["models"][name] = done["models"][name]
                results["resumed"].append(f"{name} {' and '.join(args.phases)}")
            else:
                results["models"][name] = run_model(model_dir, args)
                save_part(part_dir(out, model_dir) / "results.json", args.phases, {name: results["models"][name]})
            run_json(out).write_text(json.dumps(results, indent=2))
    run_json(out).write_text(json.dumps(results, indent=2))
    write_report(results, args, out, command)
    plot(results, out)
    return results


if __name__ == "__main__":
    main()
