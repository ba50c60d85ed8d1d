"""What a pruning method is, and the registry that finds one by name.

A method turns what it sees on calibration tokens into one score per expert (higher = keep);
:func:`diep_lightning.pipeline.select` then removes the lowest scores, so every method writes the same export.
DiEP's scores come from its search (:class:`diep_lightning.methods.diep.DiEPModule`); every other method is a
:class:`Scorer` fed by one no-grad statistics pass (:class:`diep_lightning.methods.statistics.BaselineModule`).
Adding a method is one file: subclass :class:`Scorer`, decorate it with :func:`register_method`, import it in
``methods/__init__.py``; its ``__init__`` arguments come from ``BaselineModule``'s of the same name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diep_lightning.families import MoEBlock, MoEFamily

#: DiEP is the search itself; it has no statistics scorer.
SEARCH_METHOD = "diep"
_REGISTRY: dict[str, type[Scorer]] = {}


class Scorer:
    """Accumulates routing statistics over calibration batches and returns per-expert scores.

    Class attributes:
        name: the method's name on the command line (``--model=BaselineModule --model.method=<name>``).
    """

    name: str = ""
    #: the scores' scale differs between layers (counts, norms): ranking them across layers needs normalising
    per_layer_scale: bool = False
    #: the scorer wants whole calibration batches (:meth:`observe_batch`) and the model (:meth:`setup`)
    wants_batches: bool = False

    def setup(self, model: Any, family: MoEFamily, blocks: Sequence[MoEBlock]) -> None:
        """Called once the frozen model is loaded (methods that evaluate the model itself keep it here)."""

    def observe_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Called with each calibration batch before it is routed (only when :attr:`wants_batches`)."""

    def observe(self, family: MoEFamily, block: MoEBlock, hidden: torch.Tensor, index: torch.Tensor,
                weights: torch.Tensor) -> None:
        """Called each time ``block`` routes tokens (inside a no-grad forward)."""

    def check(self, blocks: Sequence[MoEBlock], sparsity: float, mode: str) -> None:
        """Fail early (before the statistics pass) on a pruning setting the method cannot serve."""

    def scores(self, family: MoEFamily, blocks: Sequence[MoEBlock]) -> list[torch.Tensor]:
        """One (N_l,) score tensor per block; higher = keep."""
        raise NotImplementedError


def register_method(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available under its ``name``."""
    if not cls.name or cls.name in _REGISTRY or cls.name == SEARCH_METHOD:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Every method: DiEP first, then the registered scorers in registration order."""
    return (SEARCH_METHOD, *_REGISTRY)


def make_scorer(method: str, **options: Any) -> Scorer | None:
    """The scorer of ``method`` built with the options its ``__init__`` takes (None for DiEP itself).

    Raises:
        ValueError: one line naming ``method`` and the known ones.
    """
    if method == SEARCH_METHOD:
        return None
    cls = _REGISTRY.get(method)
    if cls is None:
        raise ValueError(f"method: expected one of {', '.join(method_names())}, got {method!r}")
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})
