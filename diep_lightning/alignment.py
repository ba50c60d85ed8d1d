"""Aligning experts' hidden units before they are averaged (MC-SMoE, Git Re-Basin).

Two experts trained apart compute the same kind of function with their hidden units in different orders, so
averaging their matrices entry by entry mixes unrelated units. An expert is one hidden layer between two fixed
spaces (the model's hidden size in and out), so permuting its units (rows of gate/up, columns of down, together)
leaves its function unchanged, and the permutation that best matches another expert's units by their weights is
one exact linear assignment: no calibration pass and no iteration, unlike weight matching in deep networks.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from diep_lightning.families import MoEBlock, MoEFamily


def check_alignable(family: MoEFamily, block: MoEBlock | None = None) -> None:
    """Refuse, in one line, a family (or block) whose experts' hidden-unit layout is unknown."""
    layout = family.unit_layout
    if not layout:
        raise ValueError(f"align: {type(family).__name__} does not say where its experts keep their hidden units "
                         f"(unit_layout); merge without alignment (align=false)")
    if block is not None:
        names = {name for name, _ in block.experts.named_parameters(recurse=False)}
        missing = sorted(set(layout) - names)
        if missing:
            raise ValueError(f"align: {type(family).__name__}'s experts have no {missing} tensors to align "
                             f"(they have {sorted(names)}); merge without alignment (align=false)")


def _units(slice_: torch.Tensor, spec: tuple[int, int, int]) -> torch.Tensor:
    """One expert's tensor as (units, per-unit view ...)."""
    dim, chunks, interleave = spec
    x = slice_.movedim(dim, 0)
    rest = x.shape[1:]
    if chunks > 1:
        return x.reshape(chunks, x.shape[0] // chunks, *rest).movedim(0, 1)
    return x.reshape(x.shape[0] // interleave, interleave, *rest)


def _restore(units: torch.Tensor, spec: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of :func:`_units`."""
    dim, chunks, _ = spec
    x = units.movedim(1, 0) if chunks > 1 else units
    return x.reshape(-1, *x.shape[2:]).movedim(0, dim)


def expert_units(block: MoEBlock, expert: int) -> torch.Tensor:
    """(I, F): each hidden unit's weights in every tensor of ``expert`` (gate row, up row, down column, biases)."""
    tensors = dict(block.experts.named_parameters(recurse=False))
    parts = []
    for name, spec in block.family.unit_layout.items():
        units = _units(tensors[name][expert].detach().float(), spec)
        parts.append(units.reshape(units.shape[0], -1))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def permute_units(block: MoEBlock, expert: int, perm: torch.Tensor) -> None:
    """Reorder ``expert``'s hidden units in place (unit ``i`` becomes old unit ``perm[i]``); its function stays."""
    tensors = dict(block.experts.named_parameters(recurse=False))
    for name, spec in block.family.unit_layout.items():
        tensor = tensors[name]
        units = _units(tensor[expert], spec)
        tensor[expert].copy_(_restore(units[perm.to(units.device)].clone(), spec))


def matching(block: MoEBlock, survivor: int, member: int) -> torch.Tensor:
    """The permutation of ``member``'s units that maximises their weights' inner products with ``survivor``'s."""
    a, b = expert_units(block, survivor), expert_units(block, member)
    _, cols = linear_sum_assignment((a @ b.T).double().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def align_members(block: MoEBlock, survivor: int, members: list[int]) -> dict[int, tuple[float, float]]:
    """Permute each member (not the survivor) to match the survivor, in place; return each member's cosine
    similarity to the survivor (flattened unit weights) before and after alignment: how alike they are."""
    check_alignable(block.family, block)
    target = expert_units(block, survivor).flatten()

    def cosine(member: int) -> float:
        return float(torch.nn.functional.cosine_similarity(target, expert_units(block, member).flatten(), dim=0))

    similarity = {}
    for member in members:
        if member == survivor:
            continue
        before = cosine(member)
        permute_units(block, member, matching(block, survivor, member))
        similarity[member] = (before, cosine(member))
    return similarity
