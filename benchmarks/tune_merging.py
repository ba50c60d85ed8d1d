"""Screen ExpertMerging's settings on the calibration side: prune a shipped model with DiEP's recorded scores at 25%
and 50%, plainly and with each merge setting, and compare token perplexity on C4 windows held out from the
calibration windows (what chooses the defaults, see ``TUNING.md``; never the evaluation tasks)::

    python -m benchmarks.tune_merging --model models/tiny-mixtral \\
        --settings '[{"align": false, "guard": false, "weights": "similarity"}, {}]'

One JSON line per model x sparsity x setting goes to ``--results``: held-out perplexity, the groups the guard
folded, the members' mean weight cosine to their survivor before and after alignment, and the merge stage's wall time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import RESULTS, Parser
from benchmarks.tune import token_perplexity, tuning_log
from benchmarks.tune_router import diep_scores


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = Parser("benchmarks.tune_merging", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-mixtral")
    parser.add_argument("--sparsities", default="0.25,0.5")
    parser.add_argument("--settings", default="[{}]", help="JSON list of MergeSettings fields")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heldout-samples", type=int, default=64, help="C4 windows held out for the score")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="merging")
    parser.add_argument("--results", default=str(RESULTS / "tuning_results.jsonl"))
    args = parser.parse_args(argv)
    from diep_lightning.pipeline import merge_settings

    try:
        settings = json.loads(args.settings)
        if not isinstance(settings, list):
            raise ValueError("expected a JSON list")
        for spec in settings:
            merge_settings(spec)
    except (ValueError, TypeError) as err:
        parser.error(f"--settings: {err}")
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        parser.error(f"--sparsities: comma-separated fractions, e.g. 0.25,0.5; got {args.sparsities!r}")
    parser.model_dir(args.model)
    parser.checked_file(args.results, "--results", tuning_log, "a tuning log (JSON lines of earlier runs)")
    torch.set_num_threads(args.threads)
    from diep_lightning.data import CalibrationDataModule, first_batches
    from diep_lightning.loading import load_model
    from diep_lightning.pipeline import prune

    scores = diep_scores(args.model, args)
    datamodule = CalibrationDataModule(tokenizer=args.model, num_samples=args.num_samples, seq_len=args.seq_len,
                                       batch_size=args.batch_size, seed=42, val_samples=args.heldout_samples)
    datamodule.setup()
    batches = first_batches(datamodule, 4)  # what the benchmark's merge rows calibrate on
    heldout = datamodule.val_tokens.reshape(-1)
    full_ppl = token_perplexity(load_model(args.model), heldout)
    rows = []
    for sparsity in sparsities:
        plain = token_perplexity(prune(load_model(args.model), scores, sparsity, "global").model, heldout)
        for spec in settings:
            start = time.perf_counter()
            out = prune(load_model(args.model), scores, sparsity, "global", batches=batches, merge=spec)
            seconds = time.perf_counter() - start
            groups = [g for layer in out.plan.merges for g in layer.values()]
            aligned = [s for g in groups for s in g.get("weight_cosine", [])[1:]]
            unaligned = [s for g in groups for s in g.get("weight_cosine_unaligned", [])[1:]]
            row = {"model": Path(args.model).name, "tag": args.tag, "sparsity": sparsity, "settings": spec,
                   "full_ppl": round(full_ppl, 3), "pruned_ppl": round(plain, 3),
                   "merged_ppl": round(token_perplexity(out.model, heldout), 3),
                   "groups": len(groups), "folded": sum(g.get("merged", True) is not False for g in groups),
                   "aligned_cosine": round(sum(aligned) / len(aligned), 4) if aligned else None,
                   "unaligned_cosine": round(sum(unaligned) / len(unaligned), 4) if unaligned else None,
                   "merge_s": round(seconds, 1)}
            row["vs_pruned"] = round(row["merged_ppl"] / plain, 4)
            print(json.dumps(row), flush=True)
            with open(args.results, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
