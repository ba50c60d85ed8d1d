"""GlobalExpertPruning: at the end of the search, remove the lowest-scored experts and export the model.

The callback is the orchestrator of the post-search pipeline (the work itself is the library's
:mod:`diep_lightning.pipeline`). Callbacks that take part subclass :class:`~diep_lightning.callbacks.step.PruningStep`
and override its typed methods, which this callback calls by their ``order`` (then ``trainer.callbacks`` order).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from diep_lightning.export import export_pruned
from diep_lightning.removal import apply_plan, size_report
from diep_lightning.export_dir import ExportLock, check_export_dir, check_free_space, protected_paths
from diep_lightning.frozen_moe import FrozenMoEModule
from diep_lightning.pipeline import select
from diep_lightning.callbacks.step import pruning_steps
from diep_lightning.pruning import PruningPlan, check_budget, check_sparsity


class GlobalExpertPruning(Callback):
    """Prune experts by DiEP score (alpha * beta, eq. 10) when ``fit`` ends, and export the result.

    Args:
        sparsity: fraction of all routed experts to remove, in (0, 1).
        mode: "global" (rank experts of all layers together; layers lose different numbers) or "uniform"
            (the same number from every layer; the export then loads with stock ``from_pretrained``).
        export_dir: where the export goes; default ``<log dir>/pruned``. Checked before the model loads: it may
            not be, contain or lie inside the source model or the shipped ``models/``.
        overwrite: replace an existing ``export_dir`` that is itself a previous export and holds nothing an export
            did not write (its manifest lists the files); anything else that exists is an error. One run at a time
            may export to a folder: the second is refused before its search.
        export: write the export (False: prune in memory only, e.g. for a benchmark that evaluates directly).
        method: name recorded in the model card and ``pruning.json`` (default: the module's ``method_name``).
    """

    def __init__(self, sparsity: float = 0.5, mode: Literal["global", "uniform"] = "global",
                 export_dir: str | None = None, overwrite: bool = False, export: bool = True,
                 method: str | None = None) -> None:
        super().__init__()
        self.sparsity = check_sparsity(sparsity)
        if mode not in ("global", "uniform"):
            raise ValueError(f"mode: expected 'global' or 'uniform', got {mode!r}")
        self.mode = mode
        if export_dir is not None and not str(export_dir).strip().strip("'\"").strip():
            raise ValueError(f"export_dir: {export_dir!r} names no folder; give a path")
        self.export_dir = export_dir
        self.overwrite = bool(overwrite)
        self.export = bool(export)
        self.method = method
        self.plan: PruningPlan | None = None
        self.export_path: Path | None = None
        self.pruned_model: Any = None
        self.sizes: dict[str, dict[str, int]] = {}
        self.lock: ExportLock | None = None

    # ------------------------------------------------------------------ checks before the search
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Everything that can be checked before the model loads: the module, the epochs, the sparsity
        against the config's expert count and top-k, and the export directory against the source model."""
        if not isinstance(pl_module, FrozenMoEModule):
            raise TypeError("GlobalExpertPruning: the LightningModule must be a FrozenMoEModule (DiEPModule, "
                            "BaselineModule or a subclass)")
        if stage != "fit":
            return
        if trainer.max_epochs == 0 or trainer.max_steps == 0:
            raise ValueError("trainer.max_epochs: a search of 0 epochs (or max_steps=0) would prune by untrained "
                             "scores; use max_epochs >= 1")
        config = getattr(pl_module, "hf_config", None)
        if config is not None:
            n, k = pl_module.family.config_experts(config)
            if n is not None and k is not None:
                check_budget(self.sparsity, [n], [k], self.mode, all_layers=False)
        if self.export:
            target = check_export_dir(self._target(trainer), self.overwrite,
                                      protected_paths(getattr(pl_module, "model_path", None)))
            weights = weight_bytes(getattr(pl_module, "model_path", None))
            if weights:  # the export keeps at least the non-removed share of the weights
                check_free_space(target, int(weights * (1 - self.sparsity)))
            if trainer.is_global_zero and self.lock is None:
                self.lock = ExportLock(target).acquire()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the export folder back to other runs, whether this one exported or failed."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the budget the final selection will check, now that every layer's size is known
        blocks = pl_module.blocks
        check_budget(self.sparsity, [b.num_experts for b in blocks], [b.top_k for b in blocks], self.mode)
        pl_module.check_pruning(self.sparsity, self.mode)

    def _target(self, trainer: pl.Trainer) -> Path:
        if self.export_dir is not None:
            return Path(self.export_dir)
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / "pruned"

    # ------------------------------------------------------------------ pruning
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted:  # a stopped search has no final scores to prune by
            return
        if getattr(pl_module, "device_mesh", None) is None and not trainer.is_global_zero:
            return  # DDP: every rank holds the same scores; rank 0 prunes and exports
        scores = pl_module.expert_scores()
        check_finite_scores(scores)
        model = pl_module.release_model()
        if model is None:  # non-zero ranks of a sharded run: rank 0 prunes and exports
            return
        family = pl_module.family
        plan = select(model, scores, self.sparsity, self.mode)
        original = size_report(model, family)
        for step in pruning_steps(trainer):
            step.on_experts_selected(trainer, pl_module, model, plan)
        apply_plan(model, plan, family)
        for step in pruning_steps(trainer):
            step.on_experts_removed(trainer, pl_module, model, plan)
        self.plan, self.pruned_model = plan, model
        pl_module.pruned_model = model
        after = size_report(model, family)
        self.sizes = {"before": original, "after": after}
        self._log_summary(trainer, plan, original, after)
        if self.export:
            method = self.method or pl_module.method_name
            path, figures = export_pruned(model, plan, self._target(trainer), source=pl_module.model_path,
                                          original=original, tokenizer=pl_module.load_tokenizer(),
                                          overwrite=self.overwrite, method=method, keep_on_conflict=True)
            self.export_path = path
            self._log_figures(trainer, figures)
            print(f"[diep_lightning] pruned {plan.num_removed} experts ({plan.mode}, sparsity {plan.sparsity}); "
                  f"expert bytes {original['expert_bytes']:,} -> {after['expert_bytes']:,}; export: {path}")
            for step in pruning_steps(trainer):
                step.on_pruned_export(trainer, pl_module, model, path)

    @staticmethod
    def _log_summary(trainer: pl.Trainer, plan: PruningPlan, before: dict[str, int], after: dict[str, int]) -> None:
        metrics = {f"prune/experts_kept/layer_{i}": float(len(k)) for i, k in enumerate(plan.kept)}
        metrics["prune/experts_removed"] = float(plan.num_removed)
        metrics["prune/expert_bytes_ratio"] = after["expert_bytes"] / max(1, before["expert_bytes"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @staticmethod
    def _log_figures(trainer: pl.Trainer, figures: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                for name, fig in figures.items():
                    experiment.add_figure(f"prune/{name}", fig, global_step=trainer.global_step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict() if self.plan else None,
                "export_path": str(self.export_path) if self.export_path else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = PruningPlan.from_dict(state_dict["plan"]) if state_dict.get("plan") else None
        self.export_path = Path(state_dict["export_path"]) if state_dict.get("export_path") else None


def check_finite_scores(scores: list[Any]) -> None:
    """Stop before anything is pruned or written when a score is NaN/inf, naming the layer and expert."""
    for layer, row in enumerate(scores):
        for expert, value in enumerate(row.tolist()):
            if not math.isfinite(value):
                raise FloatingPointError(f"scores: MoE layer {layer} expert {expert} has a non-finite score ({value}); "
                                         "its weights or the calibration data produce NaN/inf; nothing was pruned "
                                         "or exported")


def weight_bytes(model_path: Any) -> int:
    """Bytes of a local model's weight files (0 when it is not a local folder)."""
    folder = Path(model_path) if model_path is not None else None
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(p.stat().st_size for p in folder.glob("*.bin"))
