"""Merging pruned experts into similar survivors (DiEP A.5, MC-SMoE), as plain functions over a model and
calibration batches.

Each pruned expert joins the survivor whose outputs are most alike (linear CKA on the same tokens). Its hidden
units are first permuted to match the survivor's (:mod:`diep_lightning.alignment`; a permutation leaves its
function unchanged, so this happens in place on the model). A group's merge weights are the members' routing
frequencies on the calibration tokens (``"usage"``, MC-SMoE) or ``softmax(similarity / temperature)`` with the
survivor's self-similarity 1 (``"similarity"``). The guard then keeps a group merged only where that lowers the
pruned block's output error on calibration tokens held out from all of the above; the other groups are recorded
with the errors that rejected them and pruned plainly.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from diep_lightning.alignment import align_members, check_alignable
from diep_lightning.calibration import BlockObservation, cka_matrix, expert_outputs, observe_blocks
from diep_lightning.families import MoEBlock, MoEFamily, get_family
from diep_lightning.families.base import weighted_average
from diep_lightning.pruning import PruningPlan

#: ``{survivor: {"members": [survivor, *merged], "weights": [...], "similarity": [...], ...}}`` of one block.
MergeGroups = dict[int, dict[str, Any]]

WEIGHTINGS = ("usage", "similarity")


@dataclass
class MergeSettings:
    """How pruned experts are merged (defaults chosen in ``benchmarks/TUNING.md``).

    Attributes:
        weights: "usage" (members weighted by how often they are routed to) or "similarity" (softmax of CKA).
        temperature: softmax temperature of the "similarity" weights (lower: closer to plain pruning).
        align: permute each member's hidden units to match the survivor's before averaging.
        guard: keep a group merged only where it lowers the pruned block's error on held-out tokens.
        holdout: share of the observed calibration tokens held out for the guard.
        max_tokens: calibration tokens observed per layer.
        shares: with the guard (ignored without it), the survivor's own shares of its group to try on the grouping tokens (the members
            split the rest as ``weights`` says); the best one that beats plain pruning there is used. Empty: the
            weights as they come.
    """

    weights: str = "usage"
    temperature: float = 1.0
    align: bool = True
    guard: bool = True
    holdout: float = 0.25
    max_tokens: int = 4096
    shares: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTINGS:
            raise ValueError(f"weights: must be one of {list(WEIGHTINGS)}, got {self.weights!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature!r}")
        for name in ("align", "guard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) \
                or not 0 < self.holdout < 1:
            raise ValueError(f"holdout: must be a share in (0, 1), got {self.holdout!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens: must be an integer > 0, got {self.max_tokens!r}")
        try:
            self.shares = tuple(float(x) for x in self.shares)
        except (TypeError, ValueError):
            raise ValueError(f"shares: a list of numbers in (0, 1], got {self.shares!r}") from None
        if any(not 0 < x <= 1 for x in self.shares):
            raise ValueError(f"shares: every share must be in (0, 1], got {list(self.shares)}")
        if not self.guard:  # the shares are chosen by the guard's errors: without it the weights stand as they come
            self.shares = ()
        self.temperature, self.holdout = float(self.temperature), float(self.holdout)

    def check_family(self, family: MoEFamily) -> None:
        """Refuse, before model work, a family this merging cannot handle."""
        if self.align:
            check_alignable(family)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usage_counts(observation: BlockObservation, num_experts: int) -> torch.Tensor:
    """How many observed tokens each expert was routed to."""
    return torch.bincount(observation.index.reshape(-1).long(), minlength=num_experts).float()


def merge_groups(family: MoEFamily, block: MoEBlock, observation: BlockObservation, kept: list[int],
                 removed: list[int], temperature: float = 1.0, weights: str = "similarity") -> MergeGroups:
    """Assign each removed expert of ``block`` to its most similar survivor and compute the merge weights."""
    cka = cka_matrix(expert_outputs(family, block, observation))
    similarity = {(r, k): float(cka[r, k]) for r in removed for k in kept}
    members: dict[int, list[int]] = {}
    for r in removed:
        best = max(kept, key=lambda k: similarity[(r, k)])
        members.setdefault(best, []).append(r)
    counts = usage_counts(observation, block.num_experts) if weights == "usage" else None
    groups = {}
    for survivor, extra in members.items():
        sims = torch.tensor([1.0] + [similarity[(r, survivor)] for r in extra])
        if counts is not None:
            usage = counts[[survivor, *extra]]
            w = usage / usage.sum() if usage.sum() > 0 else torch.full_like(usage, 1.0 / len(usage))
        else:
            w = torch.softmax(sims / temperature, dim=0)
        groups[survivor] = {"members": [survivor, *extra], "weights": [float(x) for x in w],
                            "similarity": [float(s) for s in sims]}
    return groups


GroupFn = Callable[[MoEFamily, MoEBlock, BlockObservation, list[int], list[int]], MergeGroups]


def _split(observation: BlockObservation, holdout: float) -> tuple[BlockObservation, BlockObservation | None]:
    """The observed tokens for grouping and weights, and the later ones held out for the guard."""
    n = observation.hidden.shape[0]
    held = int(round(n * holdout))
    if held == 0 or held == n:
        return observation, None
    cut = n - held
    return (BlockObservation(observation.hidden[:cut], observation.index[:cut], observation.weights[:cut]),
            BlockObservation(observation.hidden[cut:], observation.index[cut:], observation.weights[cut:]))


def plan_merges(model: nn.Module, plan: PruningPlan, batches: Iterable[dict[str, torch.Tensor]],
                temperature: float = 1.0, max_tokens: int = 4096, group_fn: GroupFn | None = None,
                settings: MergeSettings | None = None) -> list[MergeGroups]:
    """Fill ``plan.merges`` for the (still unpruned) ``model`` from calibration ``batches``; return them.

    With ``settings.align`` the members' hidden units are permuted in place (the model's function is unchanged).
    With ``settings.guard`` a group stays merged (``"merged": true``) only where it lowers the pruned block's error
    on held-out tokens; ``apply_plan`` folds only those. ``group_fn`` replaces :func:`merge_groups` (a callback's
    override) with the same arguments, less temperature and weights. ``temperature``/``max_tokens`` are used when
    ``settings`` is not given.
    """
    if settings is None:
        settings = MergeSettings(weights="similarity", temperature=temperature, align=False, guard=False,
                                 max_tokens=max_tokens, shares=())
    if plan.num_removed == 0:
        raise ValueError("ExpertMerging: nothing was pruned, so there is nothing to merge; raise sparsity or drop "
                         "the ExpertMerging callback")
    family = get_family(model)
    settings.check_family(family)
    observations = observe_blocks(model, family, batches, settings.max_tokens)
    group = group_fn or (lambda f, b, o, k, r: merge_groups(f, b, o, k, r, settings.temperature, settings.weights))
    merges: list[MergeGroups] = []
    summary = []
    for block in family.blocks(model):
        removed = plan.removed[block.index]
        if not removed:
            merges.append({})
            continue
        fit, held = _split(observations[block.index], settings.holdout) if settings.guard else \
            (observations[block.index], None)
        groups = group(family, block, fit, plan.kept[block.index], removed)
        if settings.align:
            for survivor, g in groups.items():
                aligned = align_members(block, int(survivor), [int(m) for m in g["members"]])
                g["weight_cosine"] = [1.0] + [aligned[int(m)][1] for m in g["members"][1:]]
                g["weight_cosine_unaligned"] = [1.0] + [aligned[int(m)][0] for m in g["members"][1:]]
        if settings.guard and held is not None:
            summary.append({"block": block.index, **guard(family, block, held, removed, groups, fit,
                                                          settings.shares)})
        merges.append(groups)
    plan.merges = merges
    plan.merging = {**settings.to_dict(), "guard_errors": summary} if settings.guard else settings.to_dict()
    return plan.merges


def _block_output(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    out = module(hidden.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).squeeze(0).float()


@torch.no_grad()
def guard(family: MoEFamily, block: MoEBlock, held: BlockObservation, removed: list[int], groups: MergeGroups,
          fit: BlockObservation | None = None, shares: tuple[float, ...] = ()) -> dict[str, float]:
    """Decide, group by group, whether merging lowers the pruned block's output error on ``held`` tokens.

    The reference is the unpruned block's output. A copy of the block is pruned (the model is untouched); groups
    are tried in turn on top of plain pruning, each kept merged only if the block's mean squared error drops.
    With ``shares``, the survivor's own share of each group is first chosen among them on the ``fit`` tokens (the
    members split the rest in their weights' proportions), and the group's weights are rewritten. Marks each group
    ``merged`` with the errors without and with it; returns the layer's errors.
    """
    param = next(block.experts.parameters())
    sets = {"held": held.hidden.to(param.device, param.dtype)}
    if shares and fit is not None:
        sets["fit"] = fit.hidden.to(param.device, param.dtype)
    reference = {name: _block_output(block.module, hidden) for name, hidden in sets.items()}
    module = copy.deepcopy(block.module).eval()
    twin = MoEBlock(index=block.index, layer_idx=block.layer_idx, module=module,
                    router=getattr(module, family.router_attr), experts=module.experts, family=family)
    tensors = dict(twin.experts.named_parameters(recurse=False))
    members = {int(s): {m: {name: t[int(m)].clone() for name, t in tensors.items()} for m in g["members"]}
               for s, g in groups.items()}  # every member's rows, kept before removal renumbers the experts
    with warnings.catch_warnings():  # removal's warnings were given for the model itself
        warnings.simplefilter("ignore")
        keep = family.remove_experts(twin, removed)
    tensors = dict(twin.experts.named_parameters(recurse=False))

    def error(name: str) -> float:
        return float((_block_output(module, sets[name]) - reference[name]).pow(2).sum(-1).mean())

    def put(row: int, survivor: int, weights: list[float]) -> None:
        for name, t in tensors.items():
            t[row].copy_(weighted_average(torch.stack([members[survivor][m][name] for m in members[survivor]]),
                                          weights))

    plain = current = error("held")
    for survivor, g in sorted(groups.items()):
        row, weights = keep.index(int(survivor)), list(g["weights"])
        if "fit" in sets:
            rest = torch.tensor(weights[1:])
            rest = rest / rest.sum() if rest.sum() > 0 else torch.full_like(rest, 1.0 / len(rest))
            candidates = {share: [share, *((1 - share) * rest).tolist()] for share in shares}
            base, errors = error("fit"), {}
            for share, candidate in candidates.items():
                put(row, int(survivor), candidate)
                errors[share] = error("fit")
            share = min(errors, key=errors.get)
            if errors[share] < base:
                weights = candidates[share]
                g["weights"], g["survivor_share"] = [float(w) for w in weights], float(share)
        put(row, int(survivor), weights)
        trial = error("held")
        g["error_unmerged"], g["error_merged"] = current, trial
        g["merged"] = trial < current
        if g["merged"]:
            current = trial
        else:
            put(row, int(survivor), [1.0] + [0.0] * (len(weights) - 1))
    return {"error_pruned": plain, "error_guarded": current,
            "error_full_scale": float(reference["held"].pow(2).sum(-1).mean())}
