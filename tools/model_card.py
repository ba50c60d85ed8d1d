"""Measure a shipped tiny MoE with the project's own kit and write its model card (``<model>/README.md``).

    python -m tools.model_card --model models/tiny-mixtral
    python -m tools.model_card --model models/tiny-qwen-moe

Figures: held-out perplexity (WikiText-2 test, kit task ``kit_wikitext2``), BLiMP average over the 34
paradigms (``kit_blimp``), per-layer expert usage on held-out text, and per layer how much held-out loss rises
when each single expert is removed (masked out of routing). Training facts come from ``training_log.json``
written by ``tools/train_tiny_moe.py``. Everything is saved to ``<model>/card_metrics.json`` too.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from diep_lightning.outputs import read_json

REPO = Path(__file__).resolve().parents[1]

#: The tools' old locations, as training logs recorded them, and how they are run now.
MOVED = {"python3 scripts/train_tiny_moe.py": "python -m tools.train_tiny_moe",
         "python scripts/train_tiny_moe.py": "python -m tools.train_tiny_moe",
         "python scripts/model_card.py": "python -m tools.model_card"}


def held_out_batches(tokenizer, seq_len: int, count: int) -> list[torch.Tensor]:
    """Windows of WikiText-2 *test* text (never trained on) for usage and ablation measurements."""
    from diep_lightning.evaluation.kit import resolve_data_dir

    text = (resolve_data_dir(None) / "wikitext2_test.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:400_000], add_special_tokens=False)["input_ids"]
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len, seq_len)][:count]
    return [torch.tensor(windows[i:i + 8]) for i in range(0, len(windows), 8)]


@torch.no_grad()
def mean_loss(model, batches) -> float:
    losses = [float(model(input_ids=b, labels=b, use_cache=False).loss) for b in batches]
    return sum(losses) / len(losses)


@torch.no_grad()
def usage_and_ablation(model, batches) -> tuple[list[list[float]], list[list[float]], float]:
    from diep_lightning.families import get_family

    family = get_family(model)
    blocks = family.blocks(model)
    counts = {b.index: torch.zeros(b.num_experts) for b in blocks}
    hooks = family.install_routing_capture(
        blocks, lambda b, h, i, w: counts[b.index].add_(torch.bincount(i.flatten(), minlength=b.num_experts).float()))
    base = mean_loss(model, batches)
    hooks.remove()
    usage = [(counts[b.index] / counts[b.index].sum()).tolist() for b in blocks]
    rise = []
    for block in blocks:
        row = []
        for e in range(block.num_experts):
            with family.masked_routing(block, [e]):
                row.append(mean_loss(model, batches) - base)
        rise.append(row)
    return usage, rise, base


def point_at(command: str, flag: str, model_dir: Path) -> str:
    """``command`` with the folder after ``flag`` replaced by ``model_dir`` (when it names another folder), and
    the tool's current way to run it."""
    for old, new in MOVED.items():
        command = command.replace(old, new)
    found = re.search(rf"{flag} (\S+)", command)
    if found and Path(found.group(1)).resolve() != model_dir.resolve():
        return command.replace(found.group(0), f"{flag} {model_dir.as_posix()}")
    return command


def card(model_dir: Path, metrics: dict, log: dict) -> str:
    usage_rows = "\n".join(f"| {i} | " + " ".join(f"{100 * u:.1f}" for u in row) + " |"
                           for i, row in enumerate(metrics["expert_usage"]))
    rise_rows = "\n".join(f"| {i} | " + " ".join(f"{r:+.3f}" for r in row) + f" | {max(row):+.3f} / {min(row):+.3f} |"
                          for i, row in enumerate(metrics["single_expert_removal_loss_rise"]))
    config = json.loads((model_dir / "config.json").read_text())
    threads = log.get("threads", "?")
    # trained and measured in a scratch folder, then copied here: the commands name this folder
    command = point_at(log.get("command", "python -m tools.train_tiny_moe"), "--out", model_dir)
    measured_by = point_at(metrics["command"], "--model", model_dir)
    balance = {"per-layer": "per MoE layer", "global": "pooled over layers (transformers' built-in)"}.get(
        log.get("balance_loss", "global"), "on")
    return f"""---
library_name: transformers
license: apache-2.0
tags: [mixture-of-experts, tiny, diep_lightning]
---
# {model_dir.name}

A small {config['model_type']} Mixture-of-Experts LM trained from scratch by diep_lightning as the test bed for
expert pruning (random weights cannot tell a good pruning from a bad one). Loads with stock
`AutoModelForCausalLM.from_pretrained("{model_dir.as_posix()}")`.

- Architecture: {config['architectures'][0]}, {config['num_hidden_layers']} layers, hidden {config['hidden_size']},
  {metrics['num_experts']} routed experts per layer, top-{config['num_experts_per_tok']}{metrics['shared']};
  {metrics['params']:,} parameters; vocabulary {config['vocab_size']} (byte-level BPE trained on the same text).
- Data: `../shared/data/train_corpus` (C4 validation sample, Project Gutenberg, State of the Union and inaugural
  addresses, tiny-shakespeare, WikiText-2 *validation*); WikiText-2 test and every benchmark file held out.
- Training: {log.get('steps', '?')} steps, {log.get('tokens_seen', 0):,} tokens seen, seed {log.get('seed', '?')},
  router load-balancing loss {balance}, batch {log.get('batch_size', '?')} x {log.get('seq_len', '?')}, peak lr {log.get('lr', '?')}; final training loss (mean of the last 50 steps) {log.get('final_train_loss_last50', float('nan')):.3f};
  training wall time {log.get('train_wall_seconds', 0) / 60:.1f} min on a 2-core CPU machine{' (' + log['cpu'] + ')' if log.get('cpu') else ''}
  ({threads} thread{'s' if threads != 1 else ''}); held-out validation loss {log.get('val_loss', float('nan')):.3f}.
- Reproduce: `{command}`

## Measured with the project's offline kit (`{measured_by}`)

| metric | value |
|---|---|
| WikiText-2 test word perplexity (`kit_wikitext2`) | {metrics['wikitext2_word_perplexity']:.1f} |
| WikiText-2 test token-level loss on 256-token windows | {metrics['heldout_token_loss']:.3f} (perplexity {metrics['heldout_token_ppl']:.1f}) |
| BLiMP, average of 34 paradigms (`kit_blimp`, chance 50%; {metrics['limit_note']}) | {100 * metrics['blimp_acc']:.1f}% |

## Expert usage on held-out text (% of routed slots, per layer)

| layer | experts 0..N-1 |
|---|---|
{usage_rows}

## Held-out loss rise when one expert is removed (masked out of routing)

Experts matter unevenly: the spread between the most and least important expert of each layer is the signal
that expert pruning has to find.

| layer | rise per expert 0..N-1 | max / min |
|---|---|---|
{rise_rows}
"""


CARD_SECTION = "## Expert usage on held-out text"


def check_model_dir(parser: Any, model_dir: Path, render_only: bool) -> None:
    """Refuse, in one line before any evaluation, a folder whose README.md or card_metrics.json this tool did not
    write: a card replaces only an earlier card."""
    parser.model_dir(str(model_dir))
    metrics = read_json(model_dir / "card_metrics.json")
    if render_only and not isinstance(metrics, dict):
        parser.error(f"--model: {model_dir} has no readable card_metrics.json to render (--render-only)")
    if (model_dir / "card_metrics.json").exists() and not (isinstance(metrics, dict) and "expert_usage" in metrics):
        parser.error(f"--model: {model_dir / 'card_metrics.json'} was not written by this tool; it would be replaced")
    readme = model_dir / "README.md"
    if readme.exists() and CARD_SECTION not in readme.read_text(encoding="utf-8", errors="replace"):
        parser.error(f"--model: {readme} is not a card this tool wrote; it would be replaced")


def main(argv: list[str] | None = None) -> None:
    from benchmarks.files import Parser

    parser = Parser("tools.model_card", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, default=64, help="held-out 256-token windows for usage/ablation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all; for dry runs)")
    parser.add_argument("--render-only", action="store_true",
                        help="re-write README.md from the card_metrics.json already measured (no evaluation)")
    args = parser.parse_args(argv)
    check_model_dir(parser, Path(args.model), args.render_only)
    if args.render_only:
        model_dir = Path(args.model)
        metrics = json.loads((model_dir / "card_metrics.json").read_text())
        log_path = model_dir / "training_log.json"
        (model_dir / "README.md").write_text(card(model_dir, metrics, json.loads(log_path.read_text()) if log_path.exists() else {}))
        return
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diep_lightning.evaluation import evaluate
    from diep_lightning.families import get_family

    model_dir = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = evaluate(model, tokenizer=tokenizer, tasks=["kit_blimp", "kit_wikitext2"], batch_size=32,
                       limit=args.limit)
    batches = held_out_batches(tokenizer, 256, args.windows)
    usage, rise, base = usage_and_ablation(model, batches)
    family = get_family(model)
    metrics = {
        "blimp_acc": results["kit_blimp/acc"],
        "wikitext2_word_perplexity": results["kit_wikitext2/word_perplexity"],
        "heldout_token_loss": base,
        "heldout_token_ppl": float(torch.tensor(base).exp()),
        "expert_usage": usage,
        "single_expert_removal_loss_rise": rise,
        "num_experts": family.blocks(model)[0].num_experts,
        "shared": ", one shared expert" if family.has_shared_experts else "",
        "params": sum(p.numel() for p in model.parameters()),
        "limit_note": "all 1000 pairs per paradigm" if args.limit is None else f"first {args.limit} pairs per paradigm",
    }
    metrics["command"] = "python " + " ".join(sys.argv)
    log_path = model_dir / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    (model_dir / "card_metrics.json").write_text(json.dumps(metrics, indent=2))
    (model_dir / "README.md").write_text(card(model_dir, metrics, log))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()
