"""Shared handling of DeepSeek-style grouped routers (experts split into ``n_group`` contiguous groups,
tokens restricted to the best ``topk_group`` groups)."""

from __future__ import annotations

import warnings

from diep_lightning.families.base import MoEBlock


def regroup_after_removal(block: MoEBlock, keep: list[int], min_group_size: int = 1) -> None:
    """Keep the router's grouping valid once only ``keep`` (current indices) remain.

    If every group keeps the same number of experts (at least ``min_group_size``) and the allowed groups
    can still supply top-k experts, groups stay as they are (the pruned router routes exactly as the
    masked original). Otherwise grouping is reset to a single group, with a warning: the router then picks
    the top-k over all remaining experts.
    """
    router = block.router
    n_group = int(getattr(router, "num_group", 1) or 1)
    if n_group <= 1:
        return
    size = block.num_experts // n_group
    per_group = [sum(1 for e in keep if e // size == g) for g in range(n_group)]
    topk_group = int(getattr(router, "topk_group", n_group) or n_group)
    if len(set(per_group)) == 1 and per_group[0] >= min_group_size and per_group[0] * topk_group >= block.top_k:
        return
    warnings.warn(
        f"block {block.index}: experts kept per router group {per_group} are unequal or below "
        f"{min_group_size} per group; grouped routing is reset to one group for this layer (keep an equal "
        "number of experts per group to keep it)",
        stacklevel=3,
    )
    router.num_group = 1
    router.topk_group = 1
