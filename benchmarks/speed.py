"""Speed at real layer shapes: decode and prefill tokens/s of full, pruned and skipping MoEs, side by side.

    python -m benchmarks.speed                       # CPU, both shapes, fp32 and bf16: RESULTS.md section "speed"
    python -m benchmarks.speed --device cuda         # the same on a GPU
    python -m benchmarks.speed --shapes mixtral --dtypes float32 --repeats 2 --new-tokens 8   # a quick look
    python -m benchmarks.speed --shapes mixtral --dtypes float32 --skip-shares 0.25,0.34,0.4  # settings side by side

The shipped tiny models are overhead-bound (hidden 192: per-layer Python work dominates), so their timings say
nothing about what skipping or pruning saves. Here the MoE layers have real proportions, built from configs with
random weights: a few decoder layers and a small vocabulary, so that the expert layers, not the LM head, take
the time as they do in a 32-layer model.

- ``mixtral``: hidden 1024, expert intermediate 3584 (1:3.5 as Mixtral), 8 experts, top-2.
- ``qwen3``: hidden 1024, expert intermediate 384 (as Qwen3-30B-A3B's 2048:768), 64 experts, top-8 (Qwen3-MoE
  has no shared expert).
- ``mixtral-8x7b``, ``qwen3-30b-a3b``: the real models' own layers (every width, head and expert count), a layer or
  two of them (``--layers``): at a quarter of the width, per-layer fixed work (kernel launches, routing, norms)
  takes a larger share of a step than in the real model, so these say what the narrower shapes cannot.

Variants: the full model, the full model with skipping, 25% and 50% of each layer's experts pruned (uniform, by
routing frequency on the calibration tokens), each pruned model with skipping. Skipping is calibrated exactly as
in real use (:func:`diep_lightning.skipping.calibrate_skipping` on calibration tokens, here random ids), and the
skipped share it measures is reported. Every round measures every variant once, in turn, starting from another
variant each round, and ratios are taken within a round; the report gives the median ratio over rounds and its range.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import RESULTS, Parser, save_json, whole
from benchmarks.sections import publish, write_section

SHAPES: dict[str, dict[str, Any]] = {
    "mixtral": dict(model_type="mixtral", hidden_size=1024, intermediate_size=3584, num_local_experts=8,
                    num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, head_dim=128),
    "qwen3": dict(model_type="qwen3_moe", hidden_size=1024, moe_intermediate_size=384, intermediate_size=3072,
                  num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[], num_attention_heads=8, num_key_value_heads=2, head_dim=128),
    # one decoder layer of each model at its own widths (a layer's weights: 2.8 GB and 1.2 GB in bf16)
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                         num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768,
                          intermediate_size=6144, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128),
}
FULL_WIDTH = ("mixtral-8x7b", "qwen3-30b-a3b")
VARIANTS = ("full", "full_skip", "pruned_25", "pruned_25_skip", "pruned_50", "pruned_50_skip")


def build(shape: str, layers: int, vocab: int, dtype: torch.dtype, seed: int = 0, hidden: int | None = None) -> Any:
    """A random causal LM of the shape (transformers' own initialisation), in eval mode; ``hidden`` scales every
    width by the same factor (for quick checks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    if hidden is not None:
        factor = hidden / spec["hidden_size"]
        for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "head_dim"):
            if key in spec:
                spec[key] = max(8, int(spec[key] * factor))
    config = AutoConfig.for_model(model_type, vocab_size=vocab, num_hidden_layers=layers,
                                  max_position_embeddings=4096, tie_word_embeddings=False, **spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def calibration(vocab: int, batches: int = 4, batch: int = 4, seq_len: int = 128) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=gen)} for _ in range(batches)]


@torch.no_grad()
def frequency_scores(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """How often each expert is routed to on the calibration tokens (the ``frequency`` baseline's scores)."""
    from diep_lightning.families import get_family
    from diep_lightning.methods import FrequencyScorer

    family = get_family(model)
    blocks = family.blocks(model)
    scorer = FrequencyScorer()
    hooks = family.install_routing_capture(blocks, lambda b, h, i, w: scorer.observe(family, b, h, i, w))
    device = next(model.parameters()).device
    for batch in batches:
        model(input_ids=batch["input_ids"].to(device), use_cache=False)
    hooks.remove()
    return scorer.scores(family, blocks)


def share_name(share: float) -> str:
    """The model and variant name of a ``--skip-shares`` setting."""
    return f"share_{share:g}"


def variants(shape: str, args: argparse.Namespace, dtype: torch.dtype,
             device: torch.device) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The models to time (a skipping variant is its pruned model with skipping switched on), their facts, and the
    variants' names in order; pruned and calibrated on ``device``, where they are timed. With ``--skip-shares``:
    the full model and one copy of it per share, each skipping that share of the slots."""
    from diep_lightning.pipeline import prune
    from diep_lightning.removal import size_report
    from diep_lightning.skipping import calibrate_skipping

    # every timed model a copy of the built one: measured here, a copy decoded 1-3% faster than the model it was
    # copied from (how its memory was laid out), which would bias the ratios of copies against the original
    full = copy.deepcopy(build(shape, args.layers, args.vocab, dtype, hidden=args.hidden)).to(device)
    batches = calibration(args.vocab)
    if args.skip_shares:
        models = {"full": full}
        facts = {"full": {"expert_bytes": size_report(full)["expert_bytes"], "skipped_share": 0.0}}
        for share in args.skip_shares:
            name = share_name(share)
            models[name] = copy.deepcopy(full)
            facts[name] = skip_facts(models[name], calibrate_skipping(models[name], batches, share=share))
        return models, facts, ["full"] + [f"{share_name(s)}_skip" for s in args.skip_shares]
    scores = frequency_scores(full, batches)
    models, facts = {"full": full}, {}
    for sparsity in (0.25, 0.5):
        models[f"pruned_{int(sparsity * 100)}"] = prune(copy.deepcopy(full), scores, sparsity, "uniform").model
    for name in ("full", "pruned_25", "pruned_50"):
        skipping = calibrate_skipping(models[name], batches, strength=args.skip_strength, share=args.skip_share)
        facts[name] = skip_facts(models[name], skipping)
    return models, facts, list(VARIANTS)


def skip_facts(model: Any, skipping: Any) -> dict[str, float]:
    """A model's expert bytes, and the mean share of slots its calibrated skipping skips, with the strength."""
    from diep_lightning.removal import size_report

    shares = list(skipping.skipped_fraction.values())
    return {"expert_bytes": size_report(model)["expert_bytes"], "skipped_share": sum(shares) / len(shares),
            "skip_strength": skipping.strength}


def _skipping(model: Any, variant: str) -> Any:
    """Skipping on for a ``*_skip`` variant, off otherwise (the same model object serves both)."""
    if variant.endswith("_skip") or not hasattr(model, "diep_skipping"):
        return contextlib.nullcontext()
    return model.diep_skipping.disabled()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_decoding() -> None:
    """Let ``generate`` compile the decode step on any device and keep one graph per model, skipping setting and
    batch (shapes specialised, not made dynamic: each setting runs the kernels it would run alone)."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False


def compiled_generation() -> dict[str, Any]:
    """``generate`` arguments for a compiled decode step: a static cache, and compilation also off a GPU."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return {"cache_implementation": "static", "compile_config": config}


class DecodeClock:
    """A logits processor that times the decode steps alone: from the scores of the first new token (the prompt's
    prefill done) to those of the last, so a variant's decode rate does not carry its prompt's prefill."""

    def __init__(self, new_tokens: int, device: torch.device) -> None:
        self.new_tokens, self.device, self.calls, self.marks = new_tokens, device, 0, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in (1, self.new_tokens):
            _sync(self.device)
            self.marks.append(time.perf_counter())
        return scores


def prompt_ids(vocab: int, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """Random prompt token ids: one seed per timing round, the same prompts for every variant in it."""
    return torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_tps(model: Any, batch: int, new_tokens: int, device: torch.device, prompt_len: int = 8,
               compiled: bool = False, seed: int = 2) -> float:
    """Greedy decode tokens/s of the decode steps: ``batch x (new_tokens - 1)`` tokens over the time from the first
    new token's scores to the last's (the prompt's prefill left out: prefill has its own figure). ``compiled``: the
    decode step through torch.compile (what a server's CUDA graphs or compiled step do: the per-operation overhead
    goes, the expert matmuls stay)."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError(f"new_tokens: a decode rate needs at least 2 new tokens, got {new_tokens}")
    prompt = prompt_ids(model.config.vocab_size, batch, prompt_len, seed).to(device)
    extra = compiled_generation() if compiled else {}
    clock = DecodeClock(new_tokens, device)
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([clock]), **extra)
    return batch * (new_tokens - 1) / (clock.marks[-1] - clock.marks[0])


@torch.no_grad()
def decode_skipped_share(model: Any, batch: int, new_tokens: int, device: torch.device, prompt_len: int = 8,
                         seeds: tuple[int, ...] = (2,)) -> float:
    """The share of chosen expert slots skipping skips in the decode steps a timing runs (a greedy decode's tokens
    can route unlike the calibration tokens): counted over ``generate`` of ``new_tokens`` less that of one token,
    whose prefill is the same, summed over the prompts of ``seeds``."""
    skipping = model.diep_skipping
    skipped = total = 0
    skipping.counting = True
    try:
        for seed in seeds:
            counts = []
            for n in (1, new_tokens):
                skipping.clear_stats()
                prompt = prompt_ids(model.config.vocab_size, batch, prompt_len, seed).to(device)
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                stats = list(skipping.stats.values())
                counts.append((sum(s for s, _ in stats), sum(t for _, t in stats)))
            skipped += counts[1][0] - counts[0][0]
            total += counts[1][1] - counts[0][1]
    finally:
        skipping.counting = False
        skipping.clear_stats()
    return skipped / max(1, total)


def round_seeds(repeats: int) -> tuple[int, ...]:
    """The prompt seed of each timing round (the warm-up uses seed 2): at batch 1 one prompt's decode skips a share
    that swings with the prompt (0.20-0.32 over 8 prompts on the Mixtral-like shape), so each round draws its own."""
    return tuple(100 + r for r in range(repeats))


@torch.no_grad()
def prefill_tps(model: Any, tokens: int, device: torch.device) -> float:
    """Tokens/s of one forward pass over a ``tokens``-long sequence (no cache)."""
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(3)).to(device)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return tokens / (time.perf_counter() - start)


def measure(models: dict[str, Any], names: list[str], args: argparse.Namespace,
            device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Every variant once per round, in turn: ``{variant: {metric: [per-round value]}}``."""
    def run(name: str, metric: str, seed: int = 2) -> float:
        model = models[name.removesuffix("_skip")]
        with _skipping(model, name):
            if metric == "prefill":
                return prefill_tps(model, args.prefill_tokens, device)
            return decode_tps(model, int(metric.split("_")[1]), args.new_tokens, device, compiled=args.compile,
                              seed=seed)

    metrics = ["decode_1", "decode_16", "prefill"]
    for metric in metrics:  # warm-up: first calls at each shape allocate and pick kernels
        for name in names:
            run(name, metric)
    times: dict[str, dict[str, list[float]]] = {n: {m: [] for m in metrics} for n in names}
    seeds = round_seeds(args.repeats)
    for round_ in range(args.repeats):
        shift = round_ % len(names)  # each round starts from another variant: no variant always runs first
        for metric in metrics:
            for name in names[shift:] + names[:shift]:
                times[name][metric].append(run(name, metric, seeds[round_]))
        print(f"   round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{n} {times[n]['decode_1'][-1]:.1f}/{times[n]['decode_16'][-1]:.1f}" for n in names), flush=True)
    return times


def profiles(models: dict[str, Any], names: list[str], args: argparse.Namespace,
             device: torch.device) -> dict[str, dict[str, Any]]:
    """:func:`profile` of every variant at batch 1 and 16 (untimed runs, hooks on the experts)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        model = models[name.removesuffix("_skip")]
        with _skipping(model, name):
            out[name] = {f"decode_{b}": profile(model, b, args.new_tokens, device, round_seeds(args.repeats))
                         for b in (1, 16)}
    return out


@contextlib.contextmanager
def _timed_grouped_matmuls(device: torch.device, spent: list[float], counting: list[bool]) -> Any:
    """Add the time of every grouped matmul of transformers' ``grouped_mm`` experts path to ``spent[0]`` while
    ``counting[0]``: the part of the experts' time that reads expert weights, as opposed to routing, sorting,
    gathering and activations."""
    from transformers.integrations import moe

    stock = getattr(moe, "_grouped_mm", None)
    if stock is None:
        yield
        return

    def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not counting[0]:
            return stock(*args, **kwargs)
        _sync(device)
        start = time.perf_counter()
        out = stock(*args, **kwargs)
        _sync(device)
        spent[0] += time.perf_counter() - start
        return out

    moe._grouped_mm = timed
    try:
        yield
    finally:
        moe._grouped_mm = stock


@torch.no_grad()
def profile(model: Any, batch: int, new_tokens: int, device: torch.device,
            seeds: tuple[int, ...] = (2,)) -> dict[str, float]:
    """Where the timed decode steps' time goes, over the prompts of ``seeds``: the share spent inside the experts
    modules and, of that, inside their grouped matmuls, and the share of (layer, step) expert weight matrices that
    some token used (only unused ones are reads that skipping or pruning can save), beside that share if each token ran
    its top expert alone (the floor of any skipping that keeps the top expert). The prompt's prefill is left out,
    as in :func:`decode_tps`: only calls with one token per sequence count, against the decode steps' time."""
    from diep_lightning.families import get_family
    from diep_lightning.skipping import skip_mask

    spent, matmuls, used, top_used, seen, counting = [0.0], [0.0], [0], [0], [0], [False]
    starts: dict[int, float] = {}

    def pre(module: Any, args: Any) -> None:
        counting[0] = args[0].shape[0] == batch  # a decode step, not the prompt's prefill
        if not counting[0]:
            return
        idx, w = args[1], args[2]  # counted before the experts' clock starts: the hook's own work is not theirs
        top_used[0] += int(torch.unique(idx.gather(-1, w.argmax(dim=-1, keepdim=True))).numel())
        state = getattr(module, "diep_skip", None)
        if state is not None and state.group.enabled:
            idx = idx[~skip_mask(state, idx, w)]
        used[0] += int(torch.unique(idx).numel())
        seen[0] += module.num_experts
        _sync(device)
        starts[id(module)] = time.perf_counter()

    def post(module: Any, args: Any, out: Any) -> None:
        if counting[0]:
            _sync(device)
            spent[0] += time.perf_counter() - starts.pop(id(module))
        counting[0] = False

    blocks = get_family(model).blocks(model)
    handles = [h for b in blocks for h in (b.experts.register_forward_pre_hook(pre), b.experts.register_forward_hook(post))]
    total = 0.0
    try:
        with _timed_grouped_matmuls(device, matmuls, counting):
            for seed in seeds:
                total += batch * (new_tokens - 1) / decode_tps(model, batch, new_tokens, device, seed=seed)
    finally:
        for handle in handles:
            handle.remove()
    return {"experts_time_share": spent[0] / total, "experts_used_share": used[0] / max(1, seen[0]),
            "top_only_used_share": top_used[0] / max(1, seen[0]),
            "matmul_time_share": matmuls[0] / total if matmuls[0] else None, "total_s": total,
            "decode_steps_only": True}


def summarise(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and metric: median tokens/s, and the median, min and max over rounds of its ratio to full."""
    return {name: {metric: ratios(values, times["full"][metric]) for metric, values in per_metric.items()}
            for name, per_metric in times.items()}


def ratios(values: list[float], reference: list[float]) -> dict[str, float]:
    """Median tokens/s of ``values``, and the median, min and max of their round-by-round ratios to ``reference``."""
    r = [v / f for v, f in zip(values, reference)]
    return {"tps": statistics.median(values), "ratio": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r)}


def machine(device: torch.device) -> str:
    from tools.machine import cpu_name

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    # the kernels torch picks: bf16 matmuls are fast only with AVX512-BF16/AMX, so bf16 ratios differ between CPUs
    return (f"{cpu_name()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__} "
            f"(CPU kernels: {torch.backends.cpu.get_cpu_capability()})")


def _setting(results: dict[str, Any]) -> tuple[str, str]:
    """(section suffix, title words) of a run's skipping setting; empty for the paper's (strength 1)."""
    share, strength = results.get("skip_share"), results.get("skip_strength", 1.0)
    if results.get("skip_shares"):
        return "_shares", ", skipping settings side by side"
    if share is not None:
        return "_share_" + f"{share:g}".replace(".", "_"), f", skipping {share:g} of the slots"
    if strength != 1:
        return "_strength_" + f"{strength:g}".replace(".", "_"), f", skipping strength {strength:g}"
    return "", ""


def _dtype_suffix(results: dict[str, Any]) -> str:
    """Section suffix of a run without float32 (a bf16-only run keeps the fp32 section it would otherwise replace)."""
    dtypes = results.get("dtypes") or list(dict.fromkeys(key.split(" ")[1] for key in results["runs"]))
    return "" if "float32" in dtypes else "_" + "_".join(dtypes)


def full_width(results: dict[str, Any]) -> bool:
    """Whether the run timed the real models' own layers (its own RESULTS.md section)."""
    return any(key.split(" ")[0] in FULL_WIDTH for key in results["runs"])


def shape_words(shape: str) -> str:
    """A shape's widths and counts as the report states them, read from :data:`SHAPES`."""
    spec = SHAPES[shape]
    return (f"{shape}: hidden {spec['hidden_size']}, expert intermediate "
            f"{spec.get('moe_intermediate_size', spec['intermediate_size'])}, "
            f"{spec.get('num_local_experts', spec.get('num_experts'))} experts top-{spec['num_experts_per_tok']}, "
            f"{spec['num_attention_heads']} query and {spec['num_key_value_heads']} key-value heads")


def section_name(results: dict[str, Any]) -> str:
    """RESULTS.md section of a run: one per device, and one per skipping setting other than the paper's."""
    return (f"speed_{results['device']}" + ("_full_width" if full_width(results) else "")
            + ("_compiled" if results.get("compiled") else "") + _setting(results)[0] + _dtype_suffix(results))


def report(results: dict[str, Any]) -> str:
    device = results["device"]
    share, strength = results.get("skip_share"), results.get("skip_strength", 1.0)
    title = (f"## Speed at real layer shapes ({device}" + (", compiled decode step" if results.get("compiled") else "")
             + _dtype_suffix(results).replace("_", ", ") + ")" + _setting(results)[1]
             + (", the real models' own layer widths" if full_width(results) else ""))
    lines = [title, "",
             f"Measured by: `{results['command']}` on {results['machine']}. Random-weight MoEs of "
             f"{results['layers']} decoder layer{'s' if results['layers'] != 1 else ''} "
             + (f"scaled to hidden {results['hidden']} " if results.get("hidden") else "")
             + (f"of the real models' own widths ({'; '.join(map(shape_words, FULL_WIDTH))}; vocabulary 2048: the "
                "LM head reads about 1% of a batch-1 step's weights, as in Mixtral-8x7B, where Qwen3-30B-A3B's "
                "152k-token head reads about 10%, which would dilute what skipping and pruning save)"
                if full_width(results) else "with real layer proportions") + " (see `benchmarks/speed.py`); "
             f"greedy decode of {results['new_tokens']} new tokens at batch 1 and 16"
             + (" (tokens/s of the decode steps, the prompt's prefill left out; each round its own random 8-token "
                "prompts, the same for every variant)" if results.get("decode_steps_only") else "")
             + f", prefill of {results['prefill_tokens']} tokens. Each cell: median tokens/s over "
             f"{results['repeats']} rounds"
             + (" (each round starting from another variant)" if results.get("rotated") else "") + ", and "
             "the median ratio to the full model measured in the same round [min-max over rounds]. Skipped share: "
             "chosen expert slots skipped on the calibration tokens (in brackets, where measured: in the timed "
             "decode steps at batch 1 / 16" + (", over every round's prompts" if results.get("prompt_per_round") else "")
             + ")"
             + (f", with every skipping threshold scaled so that {share:g} of the slots are skipped on them "
                "(SkipCalibration's share, with the strength it took; quality at such shares: "
                "section Skipping strength against quality)." if share is not None
                else "." if strength == 1 else f", with every skipping threshold x {strength:g} (SkipCalibration's "
                "strength; its quality cost is in section Skipping strength against quality).")
             + (" Each share_X_skip variant is its own copy of the full model with the thresholds scaled so that X "
                "of the slots are skipped on the calibration tokens, all timed in the same rounds."
                if results.get("skip_shares") else "")
             + (" Decode: generate's decode step compiled (torch.compile, fullgraph, static cache; one graph per "
                "model, skipping setting and batch, compiled in the warm-up); prefill eager." if results.get("compiled")
                else "") + (f" {results['note']}" if results.get("note") else ""), ""]
    for key, entry in results["runs"].items():
        facts, summary, names = entry["facts"], entry["summary"], entry.get("variants", VARIANTS)
        lines += [f"### {key}", "", "| variant | expert bytes | skipped share | decode b=1 tok/s | x full | "
                  "decode b=16 tok/s | x full | prefill tok/s | x full |", "|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            base = name.removesuffix("_skip")
            skipped = f"{facts[base]['skipped_share']:.3f}" if name.endswith("_skip") else "0"
            decoded = facts[base].get("decode_skipped_share")
            if name.endswith("_skip") and decoded:
                skipped += f" (decode {decoded['decode_1']:.2f} / {decoded['decode_16']:.2f})"
            if name.endswith("_skip") and "skip_strength" in facts[base] and facts[base]["skip_strength"] != 1:
                skipped += f" (strength {facts[base]['skip_strength']:.2f})"
            cells = []
            for metric in ("decode_1", "decode_16", "prefill"):
                m = summary[name][metric]
                cells += [f"{m['tps']:.1f}", f"{m['ratio']:.2f} [{m['ratio_min']:.2f}-{m['ratio_max']:.2f}]"]
            lines.append(f"| {name} | {facts[base]['expert_bytes']:,} | {skipped} | " + " | ".join(cells) + " |")
        prof = entry.get("profile")
        if prof:
            steps_only = prof["full"]["decode_1"].get("decode_steps_only")
            lines += ["", "Where decode time goes (" + ("untimed runs over every round's prompts, decode steps only"
                                                         if steps_only else "one untimed run")
                      + ", with hooks on the experts modules): share of the time "
                      "inside the experts, of it inside their grouped matmuls (the expert weights' reads), and share of "
                      "(layer, step) expert weight matrices some token used"
                      + (" (in brackets: used if each token ran its top expert alone, the floor of any skipping share)"
                         if "top_only_used_share" in prof["full"]["decode_1"] else "") + ":", "",
                      "| variant | b=1 experts time | b=1 matmuls time | b=1 experts used | b=16 experts time | "
                      "b=16 matmuls time | b=16 experts used |", "|---|---|---|---|---|---|---|"]
            for name in names:
                cells = []
                for metric in ("decode_1", "decode_16"):
                    p = prof[name][metric]
                    matmuls = p.get("matmul_time_share")
                    top = p.get("top_only_used_share")
                    cells += [f"{p['experts_time_share']:.2f}", "-" if matmuls is None else f"{matmuls:.2f}",
                              f"{p['experts_used_share']:.2f}" + ("" if top is None else f" ({top:.2f})")]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += slow_bf16_lines(results) + overhead_bound_lines(results) + targets_lines(results)
    lines += [f"Note: {note}" for note in results.get("notes", [])]
    return "\n".join(lines)


def overhead_bound_lines(results: dict[str, Any]) -> list[str]:
    """A warning where the experts' grouped matmuls took under 5% of the full model's batch-1 decode: the step is
    bound by kernel launches and Python, not by reading expert weights, so neither skipping nor pruning can pay
    there, and skipping's few extra kernels per layer show as a slowdown."""
    lines = []
    for key, entry in results["runs"].items():
        share = (entry.get("profile") or {}).get("full", {}).get("decode_1", {}).get("matmul_time_share")
        if share is not None and share < 0.05:
            lines.append(f"Note: {key}: the experts' grouped matmuls took {share:.1%} of the full model's batch-1 "
                         "decode time, so decoding here is bound by kernel launches and Python work, not by the "
                         "expert weights that skipping and pruning leave unread.")
    return lines + [""] if lines else []


def slow_bf16_lines(results: dict[str, Any]) -> list[str]:
    """A warning where bf16 prefill ran slower than fp32 on the same shape: the CPU lacks fast bf16 matmul kernels,
    so its bf16 decode is compute-bound and its bf16 ratios do not carry over to a CPU or GPU that has them."""
    runs, lines = results["runs"], []
    for key in runs:
        shape, dtype = key.split(" ")
        other = runs.get(f"{shape} float32")
        if dtype == "bfloat16" and other is not None:
            bf16, fp32 = (r["summary"]["full"]["prefill"]["tps"] for r in (runs[key], other))
            if bf16 < fp32:
                lines.append(f"Note: {shape} bf16 prefill ran at {bf16 / fp32:.2f}x fp32's tokens/s on this machine "
                             "(no fast bf16 matmul kernels), so its bf16 decode is compute-bound and skipped work "
                             "pays more than where bf16 is fast.")
    return lines + [""] if lines else []


def targets_lines(results: dict[str, Any]) -> list[str]:
    """Where the speed targets of ``targets.json`` stand, per shape and dtype (median ratio over rounds, and
    whether the whole range clears it)."""
    targets = json.loads((Path(__file__).resolve().parent / "targets.json").read_text())["speed_ratio_min"]
    profiled = any(entry.get("profile") for entry in results["runs"].values())
    lines = ["Targets (x the full model's tokens/s)" + (
             ". Each skipping-alone line also gives the most skipping could give with the skipped share it measured: "
             "when that bound is below the target, no implementation of skipping reaches it on this machine at that "
             "share, and a higher share is a quality trade-off:" if profiled else
             " (no profile with a compiled step, so no bounds here):"), ""]
    for key, entry in results["runs"].items():
        names = entry.get("variants", VARIANTS)
        for target, by_metric in targets.items():  # a settings run judges each share by skipping alone's targets
            judged = [target] if target in names else [n for n in names if n.startswith("share_")] \
                if target == "full_skip" else []
            for name in judged:
                for metric, least in by_metric.items():
                    m = entry["summary"][name][metric]
                    verdict = ("met" if m["ratio_min"] >= least else "met at the median, not in every round"
                               if m["ratio"] >= least else "missed")
                    lines.append(f"- {key}: {name} {metric.replace('_', ' b=')} {m['ratio']:.2f}x "
                                 f"[{m['ratio_min']:.2f}-{m['ratio_max']:.2f}] (target >= {least:g}): {verdict}."
                                 + bounds_note(entry, name, metric))
    return lines + [""]


def skipping_bounds(entry: dict[str, Any], metric: str, variant: str = "full_skip") -> dict[str, float] | None:
    """What skipping alone could give at most, from the profile, if the skipped work cost nothing: ``weights``
    (the experts' time scales with the expert matrices some token still uses), ``compute`` (it scales with the
    chosen slots still computed) and, where the profile timed the grouped matmuls, ``matmuls`` (only the matmuls'
    time scales with the matrices used; routing, sorting and activations stay). With ``overhead``: the experts'
    work outside the matmuls that skipping added, as a share of the full model's decode time. With ``any_share``
    (where the profile counted it): the most any skipping that keeps each token's top expert could give in a step
    bound by the expert weights it reads, whatever its share (every other slot skipped)."""
    prof = entry.get("profile")
    if not prof or metric not in prof.get("full", {}):
        return None
    full, skip = prof["full"][metric], prof[variant][metric]
    share = entry["facts"][variant.removesuffix("_skip")]["skipped_share"]
    unused = 1 - skip["experts_used_share"] / full["experts_used_share"]
    bounds = {"weights": 1 / (1 - full["experts_time_share"] * unused),
              "compute": 1 / (1 - full["experts_time_share"] * share)}
    if full.get("matmul_time_share") and skip.get("matmul_time_share"):
        bounds["matmuls"] = 1 / (1 - full["matmul_time_share"] * unused)
        rest = [(p["experts_time_share"] - p["matmul_time_share"]) * p["total_s"] for p in (full, skip)]
        bounds["overhead"] = (rest[1] - rest[0]) / full["total_s"]
    if full.get("top_only_used_share") is not None:
        reads = full.get("matmul_time_share") or full["experts_time_share"]
        bounds["any_share"] = 1 / (1 - reads * (1 - full["top_only_used_share"] / full["experts_used_share"]))
    return bounds


def bounds_note(entry: dict[str, Any], name: str, metric: str) -> str:
    skipping_alone = name == "full_skip" or name.startswith("share_")
    bounds = skipping_bounds(entry, metric, name) if skipping_alone else None
    if bounds is None:
        return ""
    note = (f" If skipped work cost nothing: {bounds['weights']:.2f}x weights-bound, {bounds['compute']:.2f}x "
            "compute-bound")
    if "matmuls" in bounds:
        note += (f", {bounds['matmuls']:.2f}x if only the grouped matmuls shrink with the matrices used (the experts' "
                 f"other work added by skipping: {bounds['overhead']:+.1%} of the full model's time)")
    if "any_share" in bounds:
        note += (f"; at any share, weights-bound: {bounds['any_share']:.2f}x (each token's top expert alone still "
                 "reads the matrices of the experts some token ranks first)")
    return note + " (from the profile above)."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = Parser("benchmarks.speed", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="mixtral,qwen3", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layers", type=whole(1), default=4)
    ap.add_argument("--vocab", type=whole(64), default=2048)
    ap.add_argument("--hidden", type=whole(64, 64), default=None, help="scale every width to this hidden size (quick checks)")
    ap.add_argument("--new-tokens", type=whole(2), default=32)
    ap.add_argument("--prefill-tokens", type=whole(1), default=512)
    ap.add_argument("--repeats", type=whole(1), default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-strength", type=float, default=1.0,
                    help="SkipCalibration's strength: thresholds x this (1: the paper's median rule); a run with "
                         "another strength writes its own RESULTS.md section")
    ap.add_argument("--skip-share", type=float, default=None,
                    help="instead of --skip-strength: the share of chosen slots to skip on the calibration tokens "
                         "(a random router's weights differ from a trained one's, so the same strength skips more "
                         "here); writes its own RESULTS.md section")
    ap.add_argument("--skip-shares", default=None,
                    help="comma-separated shares: instead of the pruned variants, the full model and one copy per "
                         "share skipping that share of the slots, timed side by side (RESULTS.md section *_shares)")
    ap.add_argument("--compile", action="store_true",
                    help="decode through a compiled step (static cache); writes its own RESULTS.md section")
    ap.add_argument("--threads", type=whole(1), default=os.cpu_count())
    ap.add_argument("--out", default=None, help="where the run's JSON goes (default: benchmarks/results/speed.json for the "
                                                "CPU's eager section, speed_compiled.json for its compiled one, else "
                                                "benchmarks/results/<RESULTS.md section>.json)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"),
                    help="RESULTS.md to put the section into ('' for none)")
    ap.add_argument("--from", dest="from_json", default=None,
                    help="re-render the RESULTS.md section from an earlier run's speed.json, measuring nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        results = ap.earlier_run(args.from_json)
        if ap.report_file(args.results):
            write_section(Path(args.results), section_name(results), report(results))
        return results
    if not args.skip_strength > 0:
        ap.error(f"--skip-strength: must be > 0, got {args.skip_strength!r}")
    if args.skip_share is not None and not 0 < args.skip_share < 1:
        ap.error(f"--skip-share: must lie in (0, 1), got {args.skip_share!r}")
    if args.skip_shares is not None:
        try:
            args.skip_shares = [float(x) for x in args.skip_shares.split(",")]
        except ValueError:
            ap.error(f"--skip-shares: expected comma-separated numbers, got {args.skip_shares!r}")
        if not all(0 < x < 1 for x in args.skip_shares) or args.skip_share is not None:
            ap.error(f"--skip-shares: each must lie in (0, 1), without --skip-share; got {args.skip_shares!r}")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    bad = [d for d in args.dtypes.split(",") if d not in ("float32", "bfloat16", "float16")]
    if bad:
        ap.error(f"--dtypes: choose from float32, bfloat16, float16; got {bad}")
    ap.device(args.device)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compile:
        compile_decoding()
    shown = argv if argv is not None else sys.argv[1:]
    results: dict[str, Any] = {"command": " ".join(["python -m benchmarks.speed", *shown]), "compiled": args.compile,
                               "skip_strength": args.skip_strength, "skip_share": args.skip_share,
                               "skip_shares": args.skip_shares, "rotated": True,
                               "decode_steps_only": True, "prompt_per_round": True,
                               "dtypes": args.dtypes.split(","),
                               "machine": machine(device), "device": device.type, "layers": args.layers,
                               "hidden": args.hidden,
                               "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
                               "repeats": args.repeats, "runs": {}}
    if args.out is None:  # each section its own JSON, so a GPU's or another setting's run never replaces the CPU's
        section = section_name({**results, "runs": dict.fromkeys(f"{s} {d}" for s in args.shapes.split(",")
                                                                 for d in args.dtypes.split(","))})
        name = {"speed_cpu": "speed.json", "speed_cpu_compiled": "speed_compiled.json"}.get(section, f"{section}.json")
        args.out = str(RESULTS / name)
    ap.out_file(args.out)
    ap.report_file(args.results)
    for shape in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            key = f"{shape} {dtype_name}"
            print(f"== {key}", flush=True)
            models, facts, names = variants(shape, args, getattr(torch, dtype_name), device)
            times = measure(models, names, args, device)
            for base in (n.removesuffix("_skip") for n in names if n.endswith("_skip")):
                facts[base]["decode_skipped_share"] = {  # beside the calibration tokens' share
                    f"decode_{b}": decode_skipped_share(models[base], b, args.new_tokens, device,
                                                       seeds=round_seeds(args.repeats)) for b in (1, 16)}
            results["runs"][key] = {"facts": facts, "variants": names, "times": times, "summary": summarise(times),
                                    # the profile's hooks time eager modules: it says nothing of a compiled step
                                    "profile": None if args.compile else profiles(models, names, args, device)}
            del models
            save_json(args.out, results)
    publish(args.results, section_name(results), report(results))
    return results


if __name__ == "__main__":
    main()
