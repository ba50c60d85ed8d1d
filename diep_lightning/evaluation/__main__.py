"""``python -m diep_lightning.evaluation --model DIR --tasks kit_blimp,kit_wikitext2 --limit 100``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diep_lightning.outputs import CommandParser, Refusal, read_json, save_text, writable_file


def _limit(s: str) -> int | float:
    v = float(s)
    return int(v) if v >= 1 and v.is_integer() else v


#: the key every results JSON of this command carries: ``--output`` replaces only a file that has it
WRITTEN_BY = "_written_by"
COMMAND = "python -m diep_lightning.evaluation"


def _earlier_results(path: Path) -> bool:
    """Whether ``path`` holds the results JSON of an earlier evaluation: it carries this command's marker (keys that
    merely look like metrics, ``{"train/loss": ..}``, do not make a user's file ours)."""
    data = read_json(path)
    return isinstance(data, dict) and data.get(WRITTEN_BY) == COMMAND


def main(argv: list[str] | None = None) -> int:
    from .kit import DEFAULT_TASKS, evaluate, list_kit_tasks, resolve_data_dir

    ap = CommandParser("diep_lightning.evaluation", description="Offline lm-eval kit tasks.")
    ap.add_argument("--model", help="model directory (a saved transformers causal LM)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model directory)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task/group names")
    ap.add_argument("--limit", type=_limit, default=None, help="docs per task (or a fraction < 1)")
    ap.add_argument("--data-dir", default=None, help="eval data dir (default: repo data if present, else shipped; 'shipped')")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--bootstrap-iters", type=int, default=0, help="lm-eval bootstrap iterations for stderrs")
    ap.add_argument("--progress", action="store_true", help="show lm-eval's progress bars")
    ap.add_argument("--output", type=Path, default=None, help="write the results JSON here")
    ap.add_argument("--list", action="store_true", help="list the kit tasks for the data dir and exit")
    ap.add_argument("--render", type=Path, default=None,
                    help="write the kit task YAMLs for the data dir into this folder (for lm_eval --include_path) and exit")
    a = ap.parse_args(argv)
    try:  # before any work: an output path never replaces a file this command did not write
        if a.output:
            writable_file(a.output, "--output", _earlier_results, "the results JSON of an earlier evaluation")
    except Refusal as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if a.render:
        from .kit import render_tasks

        try:
            kit = render_tasks(a.data_dir, out_dir=a.render)
        except (ValueError, OSError) as e:
            print(f"error: --render: {str(e).removeprefix('out_dir: ').strip().splitlines()[0]}", file=sys.stderr)
            return 2
        print(f"rendered {len(kit.names)} kit tasks into {kit.task_dir}; use: lm_eval --include_path {kit.task_dir} ...")
        return 0

    if a.list:
        print(f"data dir: {resolve_data_dir(a.data_dir)}")
        print("\n".join(list_kit_tasks(a.data_dir, include_subtasks=True)))
        return 0
    if not a.model:
        ap.error("--model is required (or use --list)")
    try:
        res = evaluate(
            a.model,
            tokenizer=a.tokenizer,
            tasks=a.tasks,
            data_dir=a.data_dir,
            limit=a.limit,
            batch_size=a.batch_size,
            device=a.device,
            num_fewshot=a.num_fewshot,
            bootstrap_iters=a.bootstrap_iters,
            progress=a.progress,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, TypeError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    for key, value in res.items():
        if "/" in key:
            print(f"{key:50s} {value if value is None else f'{value:.4f}'}")
    if a.output:
        save_text(a.output, json.dumps({**res, WRITTEN_BY: COMMAND}, indent=2, sort_keys=True) + "\n")
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
