"""Screen router-calibration settings: prune a shipped model with DiEP's recorded scores, calibrate the routers
with each setting, and compare the held-out KL (calibration side: what chooses the defaults, see ``TUNING.md``).

WikiText-2 token perplexity of the full, pruned and calibrated models is printed beside it, for the report only
(text the calibration never sees; never used to choose). One JSON line per setting goes to ``--results``::

    python -m benchmarks.tune_router --model models/tiny-qwen-moe --sparsity 0.5 \\
        --settings '[{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 3e-3, "groups": ["router", "norm"]}]'

DiEP's scores are those of ``benchmarks/results/run.json`` (its seed-0 search) where that file has the model, else a
fresh seed-0 search. Calibration text: C4 train windows of the benchmark (``--num-samples`` x ``--seq-len``).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import run as bench
from benchmarks.files import RESULTS, Parser, run_json
from benchmarks.tune import token_perplexity, tuning_log, wikitext_test

HERE = Path(__file__).resolve().parent


def diep_scores(model_dir: str, args: Any) -> list[torch.Tensor]:
    """DiEP's seed-0 scores: the benchmark's recorded ones, else a fresh search."""
    results = run_json(HERE)
    name = Path(model_dir).name
    if results.is_file():
        recorded = json.loads(results.read_text()).get("models", {}).get(name, {}).get("diep_scores_seed0")
        if recorded:
            return [torch.tensor(s) for s in recorded]
    module, _ = bench.search(model_dir, "diep", args, data_seed=42)
    return module.expert_scores()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = Parser("benchmarks.tune_router", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-qwen-moe")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--settings", default="[{}]", help="JSON list of RouterCalibrationSettings fields")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="router")
    parser.add_argument("--results", default=str(RESULTS / "tuning_results.jsonl"))
    args = parser.parse_args(argv)
    from diep_lightning.router_calibration import settings_from

    try:
        settings = json.loads(args.settings)
        if not isinstance(settings, list):
            raise ValueError("expected a JSON list")
        for spec in settings:
            settings_from(spec)
    except ValueError as err:
        parser.error(f"--settings: {err}")
    parser.model_dir(args.model)
    parser.checked_file(args.results, "--results", tuning_log, "a tuning log (JSON lines of earlier runs)")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from diep_lightning.data import first_batches
    from diep_lightning.loading import load_model
    from diep_lightning.pipeline import prune

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor(tokenizer(wikitext_test().read_text()[:400_000])["input_ids"][:args.eval_tokens])
    scores = diep_scores(args.model, args)
    datamodule = bench._datamodule(args.model, args, 42)
    datamodule.setup()
    batches = first_batches(datamodule, 10**6)
    full_ppl = token_perplexity(load_model(args.model), ids)
    pruned = prune(load_model(args.model), scores, args.sparsity, "global")
    pruned_ppl = token_perplexity(pruned.model, ids)
    rows = []
    for spec in settings:
        start = time.perf_counter()
        out = prune(load_model(args.model), scores, args.sparsity, "global", router_batches=batches,
                    calibrate_router=spec)
        record = out.router_calibration
        row = {"model": Path(args.model).name, "tag": args.tag, "sparsity": args.sparsity, "settings": spec,
               "heldout_kl_before": round(record["heldout_kl_before"], 5),
               "heldout_kl_after": round(record["heldout_kl_after"], 5),
               "train_kl_after": round(record["train_kl_after"], 5), "steps_run": record["steps_run"],
               "best_step": record["best_step"], "tail_mass": round(record["teacher_tail_mass"], 4), "calibration_s": round(record["seconds"], 1),
               "wall_s": round(time.perf_counter() - start, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "full_ppl": round(full_ppl, 2), "pruned_ppl": round(pruned_ppl, 2),
               "calibrated_ppl": round(token_perplexity(out.model, ids), 2)}
        row["gap_recovered"] = round((pruned_ppl - row["calibrated_ppl"]) / max(pruned_ppl - full_ppl, 1e-9), 3)
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
