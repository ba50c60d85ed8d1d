"""The model's calibration loss and agreement with experts masked out, for methods that score by evaluating
the model itself (``ablation``, ``greedy``, ``evo``). Masking is the families' exact in-memory emulation of
removal (:meth:`~diep_lightning.families.MoEFamily.masked_routing`), so nothing is copied or changed."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diep_lightning.families import MoEBlock, MoEFamily


class MaskedLoss:
    """Calibration batches kept once, and the model evaluated on them with any experts masked.

    Args:
        max_tokens: calibration tokens kept (whole sequences, in order); every evaluation runs over them.
    """

    def __init__(self, max_tokens: int = 8192) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"reference_tokens: must be a positive integer, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.batches: list[torch.Tensor] = []
        self.tokens = 0
        self.evaluations = 0
        self.model: Any = None
        self.family: MoEFamily | None = None
        self.blocks: Sequence[MoEBlock] = ()
        self._reference: list[torch.Tensor] | None = None

    def setup(self, model: Any, family: MoEFamily, blocks: Sequence[MoEBlock]) -> None:
        self.model, self.family, self.blocks = model, family, blocks

    def keep(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep the batch's sequences until ``max_tokens`` are held."""
        ids = batch["input_ids"]
        room = (self.max_tokens - self.tokens) // ids.shape[1]
        if room > 0:
            self.batches.append(ids[:room].detach())
            self.tokens += ids[:room].numel()

    @torch.no_grad()
    def _logits(self, removed: Mapping[int, Sequence[int]]) -> list[torch.Tensor]:
        if not self.batches:
            raise ValueError("method: no calibration batch was seen; the statistics pass must run first")
        self.evaluations += 1
        with contextlib.ExitStack() as stack:
            for block in self.blocks:
                ids = list(removed.get(block.index, ()))
                if ids:
                    stack.enter_context(self.family.masked_routing(block, ids))
            return [self.model(input_ids=ids.to(self._device()), use_cache=False).logits.float() for ids in self.batches]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loss(self, removed: Mapping[int, Sequence[int]]) -> float:
        """Mean next-token cross-entropy on the kept batches with ``removed[block index]`` masked."""
        return self.evaluate(removed, agreement=False)[1]

    def agreement(self, removed: Mapping[int, Sequence[int]]) -> float:
        """Teacher-forced agreement: the share of positions whose top-1 next token equals the full model's."""
        return self.evaluate(removed)[0]

    def evaluate(self, removed: Mapping[int, Sequence[int]], agreement: bool = True) -> tuple[float, float]:
        """(agreement, loss) from one pass of the masked model (agreement is nan when not asked for)."""
        if agreement and self._reference is None:
            self._reference = [logits.argmax(-1) for logits in self._logits({})]
        total, count, same = 0.0, 0, 0
        for i, (ids, logits) in enumerate(zip(self.batches, self._logits(removed))):
            target = ids[:, 1:].to(logits.device)
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                                                             reduction="sum"))
            count += target.numel()
            if agreement:
                same += int((logits.argmax(-1) == self._reference[i]).sum())
        share = same / sum(ref.numel() for ref in self._reference) if agreement else float("nan")
        return share, total / count
