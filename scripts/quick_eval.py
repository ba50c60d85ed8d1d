#!/usr/bin/env python3
"""Quick offline evaluation of a small causal LM: BLiMP accuracy and WikiText-2 test perplexity.

A stopgap check for the shipped tiny MoE models (the project's official evaluation goes through
lm-eval). Example::

    python3 scripts/quick_eval.py --model models/tiny-mixtral --update-log

* BLiMP: the 34 paradigms in ``<data-dir>/eval/blimp/*.jsonl``. A minimal pair is right when the
  summed log-likelihood of ``sentence_good`` (conditioned on the ``<|endoftext|>`` / BOS token, so
  every sentence token is scored) beats that of ``sentence_bad``. Reported: the unweighted mean of
  the per-paradigm accuracies, plus each paradigm's accuracy. Chance is 50%.
* WikiText-2 test: the whole ``<data-dir>/eval/wikitext2_test.txt`` tokenised as one stream, cut into
  non-overlapping windows of ``context - 1`` tokens, each preceded by the BOS/EOS token, so every
  token is predicted exactly once with at most ``context`` tokens of context. Reported: perplexity per
  token of the model's own tokenizer (not comparable to word-level WikiText perplexities).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def load_model(model_dir: Path) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer in fp32 eval mode.

    Args:
        model_dir: Directory with ``config.json``, weights and tokenizer files.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tok


def prefix_id(tokenizer: Any) -> int:
    """The token that starts every scored sequence (BOS if set, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def sequence_logprobs(model: Any, seqs: list[list[int]], pad_id: int) -> list[float]:
    """Summed log-probability of tokens 1..n-1 of each sequence given its prefix.

    Args:
        model: Causal LM.
        seqs: Token id lists, each starting with the prefix token.
        pad_id: Padding id (right padding; padded positions are ignored).

    Returns:
        One summed log-likelihood per sequence.
    """
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(dim=1).tolist()


def eval_blimp(model: Any, tok: Any, blimp_dir: Path, limit: int | None, batch_size: int) -> dict[str, Any]:
    """BLiMP minimal-pair accuracy.

    Args:
        model: Causal LM.
        tok: Its tokenizer.
        blimp_dir: Directory of paradigm ``*.jsonl`` files.
        limit: Pairs per paradigm (``None``: all).
        batch_size: Sentences per forward pass.

    Returns:
        ``{"average", "pairs", "paradigms": {name: accuracy}}``.
    """
    bos = prefix_id(tok)
    per: dict[str, float] = {}
    total = 0
    for path in sorted(blimp_dir.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = rows[:limit] if limit else rows
        sents = [s for r in rows for s in (r["sentence_good"], r["sentence_bad"])]
        seqs = [[bos, *tok(s, add_special_tokens=False).input_ids] for s in sents]
        scores: list[float] = []
        for i in range(0, len(seqs), batch_size):
            scores.extend(sequence_logprobs(model, seqs[i : i + batch_size], tok.pad_token_id or 0))
        correct = sum(1 for j in range(len(rows)) if scores[2 * j] > scores[2 * j + 1])
        per[path.stem] = correct / len(rows)
        total += len(rows)
    return {"average": sum(per.values()) / len(per), "pairs": total, "paradigms": per}


@torch.no_grad()
def eval_wikitext(model: Any, tok: Any, path: Path, context: int, batch_size: int) -> dict[str, float]:
    """Token-level perplexity over non-overlapping windows.

    Args:
        model: Causal LM.
        tok: Its tokenizer.
        path: WikiText-2 test text file.
        context: Model context length (window = prefix token + ``context - 1`` text tokens).
        batch_size: Windows per forward pass.

    Returns:
        ``{"perplexity", "loss", "tokens", "context"}``.
    """
    ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    step = context - 1
    bos = prefix_id(tok)
    windows = [[bos, *ids[i : i + step]] for i in range(0, len(ids), step)]
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        lps = sequence_logprobs(model, batch, tok.pad_token_id or 0)
        nll -= sum(lps)
        count += sum(len(w) - 1 for w in batch)
    loss = nll / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count, "context": context}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description="BLiMP + WikiText-2 test perplexity for a small causal LM")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--limit-per-paradigm", type=int, default=None, help="BLiMP pairs per paradigm (default all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-wikitext", action="store_true")
    p.add_argument("--update-log", action="store_true", help="write results into <model>/training_log.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_model(args.model)
    context = int(getattr(model.config, "max_position_embeddings", 256))
    results: dict[str, Any] = {}
    blimp = eval_blimp(model, tok, args.data_dir / "eval" / "blimp", args.limit_per_paradigm, args.batch_size)
    results["blimp_average"] = blimp["average"]
    results["blimp_pairs"] = blimp["pairs"]
    results["blimp_limit_per_paradigm"] = args.limit_per_paradigm
    results["blimp_paradigms"] = blimp["paradigms"]
    print(f"BLiMP average over {len(blimp['paradigms'])} paradigms ({blimp['pairs']} pairs): "
          f"{100 * blimp['average']:.2f}%", flush=True)
    if not args.skip_wikitext:
        wt = eval_wikitext(model, tok, args.data_dir / "eval" / "wikitext2_test.txt", context, 16)
        results["wikitext2_test"] = wt
        print(f"WikiText-2 test token perplexity (context {context}, {wt['tokens']} tokens): "
              f"{wt['perplexity']:.2f}", flush=True)
    results["eval_seconds"] = time.time() - t0
    print(f"({results['eval_seconds']:.0f}s)")
    if args.update_log:
        log_path = args.model / "training_log.json"
        log = json.loads(log_path.read_text()) if log_path.is_file() else {}
        log["quick_eval"] = results
        log_path.write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
