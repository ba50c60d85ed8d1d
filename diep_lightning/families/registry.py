"""Registry of MoE family adapters, keyed by ``config.model_type`` (the PEFT / lm-eval pattern).

Adding a family touches one file: write ``families/<name>.py`` with a :class:`MoEFamily` subclass
decorated by :func:`register_family`, and import it in ``families/__init__.py``.
"""

from __future__ import annotations

import difflib
from typing import Any

from diep_lightning.families.base import MoEFamily

_REGISTRY: dict[str, MoEFamily] = {}


def register_family(cls: type[MoEFamily]) -> type[MoEFamily]:
    """Class decorator: make an adapter available for each of its ``model_types``."""
    instance = cls()
    for model_type in cls.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model_type {model_type!r} is registered twice")
        _REGISTRY[model_type] = instance
    return cls


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` that has an adapter, sorted."""
    return sorted(_REGISTRY)


def is_supported(obj: Any) -> bool:
    """Whether a model or config has an adapter."""
    return getattr(getattr(obj, "config", obj), "model_type", None) in _REGISTRY


def _model_type(obj: Any) -> str:
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ValueError(f"model: {type(obj).__name__} has no config.model_type; pass a transformers model or config")
    return str(model_type)


def _looks_dense(config: Any) -> bool:
    for attr in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return False
    return True


def get_family(obj: Any) -> MoEFamily:
    """The adapter for a model or config.

    Raises:
        ValueError: one line naming the model type, whether it is dense, the supported types and the
            closest match.
    """
    model_type = _model_type(obj)
    family = _REGISTRY.get(model_type)
    if family is not None:
        return family
    config = getattr(obj, "config", obj)
    supported = ", ".join(supported_model_types())
    if _looks_dense(config):
        raise ValueError(
            f"model: model_type {model_type!r} is a dense model with no routed experts; DiEP prunes "
            f"Mixture-of-Experts models ({supported})"
        )
    hint = difflib.get_close_matches(model_type, supported_model_types(), n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(f"model: unsupported MoE model_type {model_type!r}; supported: {supported}{did_you_mean}")
