"""Screen router-calibration settings: prune a shipped model with DiEP's recorded scores, calibrate the routers
with each setting, and compare the held-out KL (calibration side: what chooses the defaults, see ``TUNING.md``).

WikiText-2 token perplexity of the full, pruned and calibrated models is printed beside it, for the report only
(text the calibration never sees; never used to choose). One JSON line per setting goes to ``--results``::

    python -m benchmarks.tune_router --model models/tiny-qwen-moe --sparsity 0.5 \\
        --settings '[{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 3e-3, "groups": ["router", "norm"]}]'

DiEP's scores are those of ``benchmarks/results/run.json`` (its seed-0 search) where that file has the model, else a
fresh seed-0 search. Calibration text: C4 train windows of the benchmark (``--num-samples`` x ``--seq-len``), other
``--sources``, or ``generated`` (sequences sampled from the full model, ``RouterCalibration``'s default).

The calibration-side score that chooses between texts is the **panel KL**: the full-vocabulary KL from the full model
to the calibrated one on held-out windows of each domain the model was trained on (``../shared/data/train_corpus``:
C4 validation, WikiText-2 validation, tiny-shakespeare, a Gutenberg novel, State-of-the-Union addresses; the last
stretch of each, which no calibration source here draws from), and their mean.
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
#: the last 200k characters of tiny-shakespeare: a domain the calibration text (C4, books, speeches) does not hold
CORPUS = HERE.parents[1] / "shared" / "data" / "train_corpus"
OTHER_DOMAIN = CORPUS / "tinyshakespeare.txt"


def panel_texts() -> dict[str, str]:
    """The held-out end of each training domain (the panel KL's text); {} where ../shared/data is missing."""
    if not CORPUS.is_dir():
        return {}
    c4 = [json.loads(line)["text"] for line in (CORPUS / "c4_en_validation_2k.jsonl").open()][-200:]
    union = sorted((CORPUS / "state_union").iterdir())[-3:]
    return {"c4_validation": "\n\n".join(c4), "wikitext2_validation": (CORPUS / "wikitext2_valid.txt").read_text()[-200_000:],
            "shakespeare": (CORPUS / "tinyshakespeare.txt").read_text()[-200_000:],
            "gutenberg": (CORPUS / "gutenberg" / "austen-persuasion.txt").read_text()[-200_000:],
            "state_union": "".join(p.read_text(errors="ignore") for p in union)[-200_000:]}


@torch.no_grad()
def panel_kl(full: Any, model: Any, panel: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean full-vocabulary KL(full || model) per token on each domain's windows, and their mean."""
    out = {}
    for name, windows in panel.items():
        total = 0.0
        for start in range(0, len(windows), 8):
            x = windows[start:start + 8]
            p = torch.log_softmax(full(input_ids=x, use_cache=False).logits.float(), -1)
            q = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum())
        out[name] = round(total / windows.numel(), 4)
    if out:
        out["mean"] = round(sum(out.values()) / len(out), 4)
    return out


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
    parser.add_argument("--sources", default="bundled",
                        help="comma-separated calibration sources: generated (the full model's own samples) or CalibrationDataModule's (bundled, .txt/.jsonl, folders)")
    parser.add_argument("--weights", default=None, help="comma-separated share of the sequences from each source")
    parser.add_argument("--other-domain", default=str(OTHER_DOMAIN) if OTHER_DOMAIN.is_file() else "",
                        help="held-out text of a domain the calibration does not draw from: its token perplexity is "
                             "reported beside the held-out KL ('' to skip)")
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
    sources = [s for s in args.sources.split(",") if s]
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        parser.error(f"--weights: comma-separated numbers, one per source; got {args.weights!r}")
    if weights is not None and len(weights) != len(sources):
        parser.error(f"--weights: {len(weights)} numbers for {len(sources)} sources")
    if args.other_domain and not Path(args.other_domain).is_file():
        parser.error(f"--other-domain: no file at {args.other_domain}")
    parser.model_dir(args.model)
    parser.checked_file(args.results, "--results", tuning_log, "a tuning log (JSON lines of earlier runs)")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from diep_lightning.data import first_batches
    from diep_lightning.loading import load_model
    from diep_lightning.pipeline import prune

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    from diep_lightning.data import CalibrationDataModule

    from diep_lightning.router_calibration import sample_sequences, start_token
    from diep_lightning.sampling import _allocate

    counts = _allocate(args.num_samples, weights or [1.0] * len(sources))
    generated = sum(c for s, c in zip(sources, counts) if s == "generated")
    text = [(s, c) for s, c in zip(sources, counts) if s != "generated"]
    datamodule = CalibrationDataModule(tokenizer=args.model, sources=[s for s, _ in text] or ["bundled"],
                                       weights=[float(c) for _, c in text] if text else None,
                                       num_samples=max(1, args.num_samples - generated), seq_len=args.seq_len,
                                       batch_size=args.batch_size, seed=42)
    try:
        datamodule.setup()
    except (ValueError, FileNotFoundError) as err:  # a source that cannot be read: one line naming it
        parser.error(f"--sources: {err}")
    ids = torch.tensor(tokenizer(wikitext_test().read_text()[:400_000])["input_ids"][:args.eval_tokens])
    scores = diep_scores(args.model, args)
    other = (torch.tensor(tokenizer(Path(args.other_domain).read_text()[-200_000:])["input_ids"][:16384])
             if args.other_domain else None)

    def other_ppl(model: Any) -> float | None:
        return round(token_perplexity(model, other), 2) if other is not None else None

    full = load_model(args.model)
    batches = first_batches(datamodule, 10**6) if text else []
    if generated:  # the full model's own samples, shuffled in with the text so the held-out tail has both
        tokens = sample_sequences(full, generated, args.seq_len, start_token(full, tokenizer), seed=42)
        tokens = torch.cat([tokens, *[b["input_ids"] for b in batches]])
        tokens = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(42))]
        batches = [{"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}]
    panel = {k: torch.tensor(tokenizer(v)["input_ids"][:8192]).view(-1, 256) for k, v in panel_texts().items()}
    full_ppl, full_other = token_perplexity(full, ids), other_ppl(full)
    pruned = prune(load_model(args.model), scores, args.sparsity, "global")
    pruned_ppl, pruned_other = token_perplexity(pruned.model, ids), other_ppl(pruned.model)
    pruned_panel = panel_kl(full, pruned.model, panel)
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
               "calibrated_ppl": round(token_perplexity(out.model, ids), 2), "sources": sources,
               "source_weights": weights, "other_domain": Path(args.other_domain).name if other is not None else None,
               "other_ppl": [full_other, pruned_other, other_ppl(out.model)],
               "panel_kl": [pruned_panel, panel_kl(full, out.model, panel)]}
        row["gap_recovered"] = round((pruned_ppl - row["calibrated_ppl"]) / max(pruned_ppl - full_ppl, 1e-9), 3)
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
