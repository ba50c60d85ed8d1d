"""Screen ExpertMerging's temperature on the ``tune.py`` proxy.

One DiEP search with the defaults, then global pruning at 25% and 50%, without merging and with merging at each
temperature; prints the token perplexity of each pruned model (see ``TUNING.md``)::

    python -m benchmarks.tune_merging --model models/tiny-mixtral
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks import run as bench
from benchmarks import tune


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.files import Parser

    parser = Parser("benchmarks.tune_merging", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-mixtral")
    parser.add_argument("--temperatures", default="1.0,0.3,0.1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        parser.error(f"--temperatures: comma-separated numbers, e.g. 1.0,0.3,0.1; got {args.temperatures!r}")
    if any(t <= 0 for t in temperatures):
        parser.error("--temperatures: every temperature must be > 0, e.g. 1.0,0.3,0.1")
    parser.model_dir(args.model)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tokenizer(tune.wikitext_test().read_text()[:400_000])["input_ids"][:32768])
    module, datamodule = bench.search(args.model, "diep", args, data_seed=42)
    scores = module.expert_scores()
    result: dict[str, Any] = {"model": Path(args.model).name}
    for sparsity in (0.25, 0.5):
        for temperature in [None, *temperatures]:
            model = bench.prune(args.model, scores, sparsity, "global", datamodule, merge=temperature is not None,
                                merge_temperature=temperature or 1.0)[0]
            key = f"{sparsity}_{'no_merging' if temperature is None else temperature}"
            result[key] = round(tune.token_perplexity(model, ids), 2)
            print(key, result[key], flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
