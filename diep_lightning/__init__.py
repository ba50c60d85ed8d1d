"""diep_lightning: Differentiable Expert Pruning (DiEP) for Mixture-of-Experts language models on PyTorch Lightning.

Entry points: ``python -m diep_lightning fit --config configs/tiny_mixtral.yaml`` (search, prune, export); the
methods' LightningModules :class:`DiEPModule` (the search) and :class:`BaselineModule`; the Trainer-free library: :func:`select`, :func:`prune` (select -> merge -> remove -> skip), :func:`export`,
:func:`load_pruned`; :mod:`diep_lightning.families` (the per-family adapters).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["BaselineModule", "DiEPModule", "export", "load_pruned", "prune", "select", "__version__"]


def __getattr__(name: str) -> Any:
    """The methods' LightningModules, imported on first use (they pull in Lightning)."""
    if name in ("DiEPModule", "BaselineModule"):
        from diep_lightning import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'diep_lightning' has no attribute {name!r}")


def load_pruned(path: str, **kwargs: Any) -> Any:
    """Load a diep_lightning export as a transformers model; see :func:`diep_lightning.loading.load_pruned`."""
    from diep_lightning.loading import load_pruned as _load_pruned

    return _load_pruned(path, **kwargs)


def select(*args: Any, **kwargs: Any) -> Any:
    """The experts to remove; see :func:`diep_lightning.pipeline.select`."""
    from diep_lightning.pipeline import select as _select

    return _select(*args, **kwargs)


def prune(*args: Any, **kwargs: Any) -> Any:
    """Select, merge, remove and calibrate skipping in place; see :func:`diep_lightning.pipeline.prune`."""
    from diep_lightning.pipeline import prune as _prune

    return _prune(*args, **kwargs)


def export(*args: Any, **kwargs: Any) -> Any:
    """Write a pruned model and its plan; see :func:`diep_lightning.export.export_pruned`."""
    from diep_lightning.export import export_pruned

    return export_pruned(*args, **kwargs)
