"""LmEvalValidation: score the model with lm-eval before the search and after pruning, and report the ratio."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from diep_lightning.callbacks.step import PruningStep
from diep_lightning.evaluation import evaluate, validate_tasks
from diep_lightning.outputs import read_json, save_json, writable_file

_SUMMARY_KEYS = {"tasks", "limit", "baseline", "pruned", "ratio"}
#: the marker every summary carries: ``output`` replaces only a file that has it, never one shaped like it
_MARKER = {"_written_by": "diep_lightning.callbacks.LmEvalValidation"}


def _earlier_summary(path: Path) -> bool:
    """Whether ``path`` holds the summary an earlier run of this callback wrote."""
    data = read_json(path)
    return isinstance(data, dict) and all(data.get(k) == v for k, v in _MARKER.items())


class LmEvalValidation(PruningStep):
    """Run lm-eval on the model being pruned: a baseline before the search, optionally at validation epochs,
    and the pruned (merged, skipping) model once :class:`GlobalExpertPruning` has exported it.

    Offline, use the kit's local tasks (``kit_blimp``, ``kit_wikitext2``, ...); online, any lm-eval task name.
    Every metric goes to the Lightning loggers (``lm_eval/baseline/<task>/<metric>``,
    ``lm_eval/pruned/...``), and ``lm_eval.json`` (baseline, pruned, pruned / baseline) is written into the
    export directory (or ``output``).

    Under DDP/FSDP2 global rank 0 evaluates a full copy and broadcasts the results to the other ranks, which wait
    (lm-eval itself runs in one process); single-process runs evaluate the model object itself.

    Args:
        tasks: task names (kit or lm-eval hub); checked before any model work.
        limit: documents per task (int) or fraction (float); None: all.
        batch_size: lm-eval batch size.
        data_dir: the kit's data directory (None: ``../shared/data/eval`` when present, else the shipped subset).
        baseline: evaluate the unpruned model at fit start.
        every_n_epochs: also evaluate the search model (scaled by the current alpha/beta) every n epochs.
        output: where to write the JSON summary (default: ``<export dir>/lm_eval.json``): a new file or one an
            earlier run of this callback wrote, checked before any model work.
    """

    def __init__(self, tasks: list[str] | str = ("kit_blimp", "kit_wikitext2"), limit: int | float | None = None,
                 batch_size: int = 8, data_dir: str | None = None, baseline: bool = True,
                 every_n_epochs: int | None = None, output: str | None = None) -> None:
        super().__init__()
        if limit is not None and (isinstance(limit, bool) or not limit > 0):
            raise ValueError(f"limit: documents per task must be > 0 (int) or a fraction in (0, 1], got {limit!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
        if every_n_epochs is not None and every_n_epochs <= 0:
            raise ValueError(f"every_n_epochs: must be a positive integer or null, got {every_n_epochs!r}")
        if output is not None:
            writable_file(output, "output", _earlier_summary, "the summary of an earlier LmEvalValidation")
        self.tasks = validate_tasks(list(tasks) if not isinstance(tasks, str) else tasks, data_dir)
        self.limit, self.batch_size, self.data_dir = limit, batch_size, data_dir
        self.baseline, self.every_n_epochs, self.output = baseline, every_n_epochs, output
        self.results: dict[str, Any] = {}

    def _evaluate(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        return evaluate(model, tokenizer=tokenizer, tasks=self.tasks, data_dir=self.data_dir, limit=self.limit,
                        batch_size=self.batch_size)

    @staticmethod
    def headline(results: dict[str, Any]) -> dict[str, float]:
        """The flat ``task/metric`` numbers."""
        return {k: v for k, v in results.items() if "/" in k and isinstance(v, (int, float))}

    def _log(self, trainer: pl.Trainer, stage: str, results: dict[str, Any]) -> None:
        metrics = {f"lm_eval/{stage}/{k}": float(v) for k, v in self.headline(results).items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.headline(results).items())
        print(f"[diep_lightning] lm-eval {stage}: {shown}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.baseline or "baseline" in self.results:
            return
        model = self._full_model(trainer, pl_module)
        if model is not None:
            unscaled = getattr(pl_module, "unscaled", contextlib.nullcontext)
            with unscaled():
                self.results["baseline"] = self._evaluate(model, pl_module.load_tokenizer())
            self._log(trainer, "baseline", self.results["baseline"])
        # rank 0 evaluated; every rank gets its results (so any rank's callback state is complete)
        self.results["baseline"] = trainer.strategy.broadcast(self.results.get("baseline"), src=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if getattr(pl_module, "device_mesh", None) is not None:
            return  # the scaled model is sharded; evaluating it needs every rank inside lm-eval
        results = self._evaluate(pl_module.model, pl_module.load_tokenizer())
        pl_module.model.eval()
        self.results.setdefault("search", {})[str(trainer.current_epoch)] = results
        self._log(trainer, "search", results)

    def on_pruned_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: Any,
                         export_dir: Path) -> None:
        results = self._evaluate(model, pl_module.load_tokenizer())
        self.results["pruned"] = results
        self._log(trainer, "pruned", results)
        summary = {**_MARKER, "tasks": self.tasks, "limit": self.limit,
                   "baseline": self.headline(self.results.get("baseline", {})),
                   "pruned": self.headline(results)}
        summary["ratio"] = {k: v / summary["baseline"][k] for k, v in summary["pruned"].items()
                            if summary["baseline"].get(k)}
        target = Path(self.output) if self.output else Path(export_dir) / "lm_eval.json"
        save_json(target, summary, indent=2)

    @staticmethod
    def _full_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if getattr(pl_module, "device_mesh", None) is None:
            return pl_module.model
        if not trainer.is_global_zero:
            return None
        return pl_module.load_source_model()

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = state_dict.get("results", {})
