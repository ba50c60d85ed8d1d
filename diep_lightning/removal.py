"""Remove a plan's experts from a model in place, and measure what that saves."""

from __future__ import annotations

import torch
from torch import nn

from diep_lightning.families import MoEFamily, get_family
from diep_lightning.pruning import PruningPlan


def expert_bytes(model: nn.Module, family: MoEFamily | None = None) -> tuple[int, int]:
    """(parameter count, bytes) of the routed experts' tensors."""
    family = family or get_family(model)
    params = [p for block in family.blocks(model) for p in block.experts.parameters()]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes) of the whole model (tied weights counted once)."""
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values()), sum(p.numel() * p.element_size() for p in seen.values())


def apply_plan(model: nn.Module, plan: PruningPlan, family: MoEFamily | None = None) -> None:
    """Merge (the plan's merge groups the guard kept) then physically remove the plan's experts, in place."""
    family = family or get_family(model)
    blocks = family.blocks(model)
    if len(blocks) != len(plan.removed):
        raise ValueError(f"plan: made for {len(plan.removed)} MoE layers, the model has {len(blocks)}")
    for block, removed, merges in zip(blocks, plan.removed, plan.merges or [{}] * len(blocks)):
        for survivor, group in merges.items():
            if group.get("merged", True) is False:  # the guard found plain pruning better here
                continue
            family.merge_experts(block, int(survivor), [int(m) for m in group["members"]], group["weights"])
        family.remove_experts(block, removed)


def layout(model: nn.Module, family: MoEFamily | None = None) -> list[dict[str, int] | None]:
    """Per decoder layer: None (dense) or the block's expert count and router grouping."""
    family = family or get_family(model)
    spec: list[dict[str, int] | None] = [None] * len(family.decoder_layers(model))
    for block in family.blocks(model):
        entry: dict[str, int] = {"num_experts": block.num_experts}
        if getattr(block.router, "num_group", None) is not None:
            entry["num_group"] = int(block.router.num_group)
            entry["topk_group"] = int(block.router.topk_group)
        spec[block.layer_idx] = entry
    return spec


def is_uniform(spec: list[dict[str, int] | None]) -> bool:
    """Whether every MoE layer of ``spec`` (from :func:`layout`) has the same experts and grouping."""
    moe = [s for s in spec if s]
    return all(s == moe[0] for s in moe)


def size_report(model: nn.Module, family: MoEFamily | None = None) -> dict[str, int]:
    """Parameter and byte counts of the whole model and of its routed experts."""
    params, nbytes = model_bytes(model)
    eparams, ebytes = expert_bytes(model, family)
    return {"params": params, "bytes": nbytes, "expert_params": eparams, "expert_bytes": ebytes}
