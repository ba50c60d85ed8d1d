"""diep_lightning: Differentiable Expert Pruning (DiEP) for Mixture-of-Experts language models on PyTorch Lightning.

Entry points: ``python -m diep_lightning fit --config configs/tiny_mixtral.yaml`` (search, prune, export),
:func:`load_pruned` (load an export), :mod:`diep_lightning.families` (the per-family adapters).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_pruned", "__version__"]


def load_pruned(path: str, **kwargs: Any) -> Any:
    """Load a diep_lightning export as a transformers model; see :func:`diep_lightning.export.load_pruned`."""
    from diep_lightning.export import load_pruned as _load_pruned

    return _load_pruned(path, **kwargs)
