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
from diep_lightning.skipping import skipped_slots, skipped_weights

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
        out[layer] = thresholds.fill_diagonal_(0.0)
    return out, skipping.renormalize


def redirect_skipped(thresholds: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights, topk_ids)`` with every skipped slot sent to its token's top expert at weight 0 (the same
    rule and weights as :func:`diep_lightning.skipping.install_skipping`)."""
    ids = topk_ids.long()
    skip, top_expert = skipped_slots(thresholds.to(topk_weights.dtype), ids, topk_weights)
    new_ids = torch.where(skip, top_expert, ids).to(topk_ids.dtype)
    return skipped_weights(topk_weights, skip, renormalize), new_ids
