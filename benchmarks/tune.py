"""Screen DiEP settings quickly: search, prune 25% and 50%, held-out token perplexity of each pruned model.

A cheaper proxy for the full benchmark (``run.py``), used to choose DiEP's defaults (see ``TUNING.md``): the
search runs on 64 x 128 calibration tokens (the benchmark: 128 x 256) for 10 epochs, and quality is the token
perplexity on the first 32k tokens of WikiText-2 test with 256-token windows. Each call appends one JSON line
to ``--results``. Examples (from the repository root)::

    python -m benchmarks.tune --model models/tiny-mixtral --tag default
    python -m benchmarks.tune --model models/tiny-mixtral --tag paper-sgd \\
        --module '{"alpha_scaling": "softmax", "alpha_opt": "sgd", "alpha_lr": 1.0, "beta_opt": "sgd", "beta_lr": 1.0}'
    python -m benchmarks.tune --model models/tiny-mixtral --method reap --modes global,uniform

``--module`` takes DiEPModule keyword arguments as JSON, plus ``alpha_opt``/``beta_opt`` ("adam" or "sgd") and
``alpha_lr``/``beta_lr``, which become the optimizer factories.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import run as bench  # the benchmark's search and prune helpers
from benchmarks.files import RESULTS, Parser

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "wikitext2_test.txt"


def wikitext_test() -> Path:
    """WikiText-2 test: the full file next to the checkout (what TUNING.md measured), else the kit's shipped
    subset (figures then differ from TUNING.md's; a line says so)."""
    if SHARED_DATA.is_file():
        return SHARED_DATA
    from diep_lightning.evaluation.kit import SHIPPED_DATA_DIR

    print(f"note: {SHARED_DATA} is absent; using the kit's shipped WikiText-2 subset, so figures are not "
          "comparable with TUNING.md", file=sys.stderr)
    return SHIPPED_DATA_DIR / "wikitext2_test.txt"


@torch.no_grad()
def token_perplexity(model: Any, ids: torch.Tensor, ctx: int = 256) -> float:
    """exp(mean next-token NLL) over consecutive ``ctx``-token windows of ``ids``."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        window = ids[start:start + ctx + 1]
        if len(window) < 2:
            break
        logits = model(input_ids=window[None, :-1], use_cache=False).logits[0]
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count)


def module_kwargs(spec: str) -> dict[str, Any]:
    """DiEPModule kwargs from JSON; ``{alpha,beta}_{opt,lr}`` become optimizer factories."""
    try:
        kwargs = json.loads(spec)
    except ValueError as err:
        raise SystemExit(f"error: --module: not JSON ({err})") from None
    if not isinstance(kwargs, dict):
        raise SystemExit(f"error: --module: expected a JSON object of DiEPModule arguments, got {spec!r}")
    for name in ("alpha", "beta"):
        opt, lr = kwargs.pop(f"{name}_opt", None), kwargs.pop(f"{name}_lr", None)
        if opt is None and lr is None:
            continue
        if opt not in (None, "adam", "sgd"):
            raise SystemExit(f"error: --module: {name}_opt must be 'adam' or 'sgd', got {opt!r}")
        cls = torch.optim.SGD if opt == "sgd" else torch.optim.Adam
        lr = 5e-3 if lr is None else float(lr)
        kwargs[f"{name}_optimizer"] = lambda params, cls=cls, lr=lr: cls(params, lr=lr)
    return kwargs


def tuning_log(path: Path) -> bool:
    """Whether ``path`` holds only earlier runs' lines (each a JSON object naming its model and tag)."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return all({"model", "tag"} <= set(json.loads(line)) for line in lines)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = Parser("benchmarks.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-mixtral")
    parser.add_argument("--method", default="diep", choices=["diep", "random", "frequency", "reap", "naee"])
    parser.add_argument("--module", default="{}", help="DiEPModule keyword arguments as JSON (see above)")
    parser.add_argument("--modes", default="global", help="comma-separated pruning modes: global, uniform")
    parser.add_argument("--seed", type=int, default=0, help="calibration-data seed offset (and random's seed)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="")
    parser.add_argument("--results", default=str(RESULTS / "tuning_results.jsonl"))
    args = parser.parse_args(argv)
    kwargs = module_kwargs(args.module)  # bad JSON fails here, before any model is loaded
    parser.model_dir(args.model)
    parser.checked_file(args.results, "--results", tuning_log, "a tuning log (JSON lines of earlier runs)")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tokenizer(wikitext_test().read_text()[:400_000])["input_ids"][:args.eval_tokens])
    start = time.perf_counter()
    module, _ = bench.search(args.model, args.method, args, data_seed=42 + args.seed, random_seed=args.seed, **kwargs)
    result: dict[str, Any] = {"model": Path(args.model).name, "tag": args.tag, "method": args.method,
                              "module": args.module, "seed": args.seed,
                              "search_s": round(time.perf_counter() - start, 1)}
    result["full_ppl"] = round(token_perplexity(AutoModelForCausalLM.from_pretrained(args.model), ids), 2)
    for mode in args.modes.split(","):
        for sparsity in (0.25, 0.5):
            if args.method == "naee":  # its subset size is its own argument: one pass per sparsity
                module, _ = bench.search(args.model, "naee", args, naee_keep=bench.naee_keep(args.model, sparsity))
                module.check_pruning(sparsity, mode)
            model, plan, _, _ = bench.prune(args.model, module.expert_scores(), sparsity, mode)
            result[f"{mode}_{int(sparsity * 100)}_ppl"] = round(token_perplexity(model, ids), 2)
            result[f"{mode}_{int(sparsity * 100)}_kept"] = [len(k) for k in plan.kept]
    if args.method == "diep":
        result["beta"] = [round(float(b), 3) for b in module.beta]
        result["alpha_logit_range"] = [round(float(a.max() - a.min()), 3) for a in module.alpha_logits]
    print(json.dumps(result), flush=True)
    with open(args.results, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
