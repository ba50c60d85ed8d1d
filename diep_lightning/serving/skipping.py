"""Adaptive expert skipping where the serving engine routes (vLLM), without importing the engine (tested everywhere).

An engine's fused-MoE kernels take ``(topk_weights, topk_ids)`` and differ in what they accept (sentinel ids, -1 ids,
expert maps), so a skipped slot is not dropped there: it is sent to the token's top expert with weight 0. Every
kernel then reads no weights of the skipped expert for that token, the output equals skipping's (``x + 0 * y``),
and the shapes stay fixed, so CUDA graphs capture it as they capture the stock routing.
"""

from __future__ import annotations

from typing import Any

import torch

from diep_lightning.pruning import recorded_skipping
from diep_lightning.skipping import Thresholds, skipped_slots, skipped_weights

#: the config field that turns recorded skipping off in an engine (``hf_overrides={"diep_skipping": False}``)
SWITCH = "diep_skipping"


def layer_thresholds(record: dict[str, Any] | None, counts: list[int]) -> tuple[dict[int, torch.Tensor], bool]:
    """Per decoder layer index, the (N, N) skipping thresholds an export's ``pruning.json`` records, and whether
    surviving weights are renormalised; ``({}, False)`` when it records none. MoE block j of the record is the j-th
    decoder layer with routed experts (``counts``: each layer's routed-expert count, 0 for a dense layer).

    Raises:
        ValueError: one line when the record does not fit the model's layers.
    """
    skipping = recorded_skipping((record or {}).get("plan") or {})
    if skipping is None:
        return {}, False
    moe_layers = [i for i, c in enumerate(counts) if c]
    out = {}
    for block, gamma in sorted(skipping.gammas.items()):
        if not 0 <= block < len(moe_layers):
            raise ValueError(f"pruning.json: skipping recorded for MoE layer {block}, the model has "
                             f"{len(moe_layers)} MoE layers")
        layer = moe_layers[block]
        thresholds = torch.tensor(gamma, dtype=torch.float32)
        if thresholds.shape != (counts[layer], counts[layer]):
            raise ValueError(f"pruning.json: skipping thresholds of MoE layer {block} are {tuple(thresholds.shape)}, "
                             f"its decoder layer {layer} has {counts[layer]} experts")
        out[layer] = Thresholds(thresholds).gamma
    return out, skipping.renormalize


class ServedSkipping:
    """The skipping an engine's model holds: the decoder layers that skip, a switch read on every routing call, and
    skipped-slot counts kept only while ``counting`` (tensors on the model's device: no host sync per layer).

    The switch lets one engine compare skipping on and off on the same weights
    (``llm.apply_model(lambda m: setattr(m.diep_skipping, "enabled", False))``); it acts in eager mode only, since
    a captured CUDA graph replays the routing it captured.
    """

    def __init__(self, layers: list[int] | None = None) -> None:
        self.layers = sorted(layers or [])
        self.enabled = True
        self.counting = False
        self.skipped: dict[int, torch.Tensor] = {}
        self.slots: dict[int, torch.Tensor] = {}
        self.experts: dict[int, list[int]] = {}

    def observe(self, layer: int, skip: torch.Tensor, routed: torch.Tensor, served: torch.Tensor) -> None:
        """Count skipped slots (no sync) and the distinct experts a call routes to before and after skipping (a
        host sync: counting is for measurement)."""
        if layer not in self.skipped:
            self.skipped[layer] = torch.zeros((), dtype=torch.long, device=skip.device)
            self.slots[layer] = torch.zeros((), dtype=torch.long, device=skip.device)
            self.experts[layer] = [0, 0]
        self.skipped[layer] += skip.sum()
        self.slots[layer] += skip.numel()
        self.experts[layer][0] += int(routed.unique().numel())
        self.experts[layer][1] += int(served.unique().numel())

    def skipped_share(self) -> float | None:
        """Share of all routed slots skipped while counting (None before any was counted)."""
        slots = sum(int(v) for v in self.slots.values())
        return sum(int(v) for v in self.skipped.values()) / slots if slots else None

    def experts_read_share(self) -> float | None:
        """Distinct experts computed per call with skipping over those routed to, summed over calls while counting:
        the share of expert weights a memory-bound fused kernel still reads."""
        routed = sum(v[0] for v in self.experts.values())
        return sum(v[1] for v in self.experts.values()) / routed if routed else None

    def reset_counts(self) -> None:
        self.skipped, self.slots, self.experts = {}, {}, {}


def redirect_skipped(thresholds: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     renormalize: bool = False, state: ServedSkipping | None = None,
                     layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights, topk_ids)`` with every skipped slot sent to its token's top expert at weight 0 (the same
    rule and weights as :func:`diep_lightning.skipping.install_skipping`; ``thresholds`` on the weights' device and
    in their dtype, e.g. from :meth:`Thresholds.like`); unchanged while ``state`` is switched off, and counted into
    it while it counts."""
    if state is not None and not state.enabled:
        return topk_weights, topk_ids
    ids = topk_ids.long()
    skip, top_expert = skipped_slots(thresholds, ids, topk_weights)
    new_ids = torch.where(skip, top_expert, ids).to(topk_ids.dtype)
    if state is not None and state.counting:
        state.observe(layer, skip, topk_ids, new_ids)
    return skipped_weights(topk_weights, skip, renormalize), new_ids
