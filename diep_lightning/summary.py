"""What a finished run tells its user: a few lines at the end of the console (what was pruned, the scores
before and after, where the export, ``lm_eval.json`` and the logs are), and the quiet that makes them visible
(Lightning's tips and the warnings that are by design here)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

#: Warnings that describe this project's design, not a problem of the user's run.
_BY_DESIGN = (
    r".*no(t have a)? `validation_step`.*",  # the search has no validation loop
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning, not ours to fix
    r".*module\(s\) in eval mode.*",  # the frozen model stays in eval mode on purpose (deterministic routing)
    r".*`training_step` returned `None`.*",  # baselines only collect statistics
    r".*LightningCLI's args parameter.*",
    r".*The number of training batches \(\d+\) is smaller than the logging interval.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*configure_optimizers. returned .None., this fit will run with no optimizer.*",  # baselines: no gradients
)


class _Drop(logging.Filter):
    """Drops log records whose message contains one of the given phrases."""

    def __init__(self, *phrases: str) -> None:
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.phrases)


def quiet() -> None:
    """Silence output that is not the user's business; real warnings and errors still show."""
    for pattern in _BY_DESIGN:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_Drop("Tip:", "to estimate number of stepping batches"))
    # calibration documents are tokenized whole and then cut into windows, so long documents are expected
    logging.getLogger("transformers.tokenization_utils_base").addFilter(_Drop("Token indices sequence length"))
    for name in ("lm_eval", "lm-eval", "lm_eval.api.task", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # the kit hands lm-eval a model object on purpose (one process, the run's own model)
    logging.getLogger("lm_eval.models.huggingface").addFilter(
        _Drop("is not of type `str`", "Passed an already-initialized model"))
    # per-file progress bars of datasets (one per BLiMP paradigm) and of transformers' weight loading; datasets
    # reads the variable when first imported, so a run that never loads it does not pay its second of imports
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def run_summary(trainer: Any, seconds: float) -> str:
    """The closing lines of a ``fit``: read from the callbacks' public state, so it never re-computes anything."""
    from diep_lightning.callbacks import GlobalExpertPruning, LmEvalValidation, RouterCalibration, SkipCalibration

    lines = [f"[diep_lightning] finished in {seconds / 60:.1f} min"]
    pruning = next((c for c in trainer.callbacks if isinstance(c, GlobalExpertPruning)), None)
    if pruning is not None and pruning.plan is not None:
        plan = pruning.plan
        total = sum(len(s) for s in plan.scores)
        kept = ", ".join(str(len(k)) for k in plan.kept)
        lines.append(f"  pruned     {plan.num_removed} of {total} experts ({plan.mode}, sparsity {plan.sparsity:g}); "
                     f"kept per MoE layer: {kept}")
        if pruning.sizes:
            before, after = pruning.sizes["before"]["expert_bytes"], pruning.sizes["after"]["expert_bytes"]
            lines.append(f"  experts    {before:,} -> {after:,} bytes ({100 * (1 - after / max(before, 1)):.1f}% smaller)")
    router = next((c for c in trainer.callbacks if isinstance(c, RouterCalibration)), None)
    if router is not None and router.record:
        r = router.record
        lines.append(f"  routers    calibrated ({r['parameters']:,} parameters, {r['steps_run']} steps); held-out KL to "
                     f"the original model {r['heldout_kl_before']:.4f} -> {r['heldout_kl_after']:.4f}")
    skipping = next((c for c in trainer.callbacks if isinstance(c, SkipCalibration)), None)
    if skipping is not None and skipping.skipped_fraction:
        share = sum(skipping.skipped_fraction.values()) / len(skipping.skipped_fraction)
        lines.append(f"  skipping   calibrated; {100 * share:.1f}% of expert calls skipped on calibration tokens")
    evaluation = next((c for c in trainer.callbacks if isinstance(c, LmEvalValidation)), None)
    if evaluation is not None and evaluation.results:
        base = LmEvalValidation.headline(evaluation.results.get("baseline", {}))
        pruned = LmEvalValidation.headline(evaluation.results.get("pruned", {}))
        for key in sorted(set(base) | set(pruned)):
            b, p = base.get(key), pruned.get(key)
            shown = " -> ".join(_fmt(v) if v is not None else "n/a" for v in (b, p))
            lines.append(f"  {key:<40} {shown}   (before -> after)")
    if pruning is not None and pruning.export_path is not None:
        lines.append(f"  export     {pruning.export_path}   (load: diep_lightning.load_pruned(path))")
        if evaluation is not None and (pruning.export_path / "lm_eval.json").is_file():
            lines.append(f"  lm-eval    {pruning.export_path / 'lm_eval.json'}")
    log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger is not None else None
    if log_dir:
        root = Path(log_dir).parent.parent
        lines.append(f"  logs       {log_dir}   (tensorboard --logdir {root})")
    return "\n".join(lines)
