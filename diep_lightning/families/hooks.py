"""Hooks installed on a family's modules, and the torch-function mode that masks router logits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode


class HookGroup:
    """Removable handles of hooks installed together, with an on/off switch the hooks read."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.enabled = True

    def remove(self) -> None:
        """Uninstall every hook of the group."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily switch the hooks off (the teacher pass of DiEP: same weights, no scaling)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous


class _AddToLinear(TorchFunctionMode):
    """Adds a fixed tensor to the output of ``F.linear`` calls made with one given weight.

    Routers compute their logits with ``F.linear(hidden, router.weight[, bias])`` inside their forward; this
    mode is how a logit mask is applied without re-implementing each family's routing rule.
    """

    def __init__(self, weight: torch.Tensor, addend: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.addend = addend

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.weight:
                out = out + self.addend.to(out.dtype)
        return out
