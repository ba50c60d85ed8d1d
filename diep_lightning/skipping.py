"""Adaptive expert skipping at inference (DiEP 4.3): drop a chosen expert whose routing weight is small
relative to the token's top expert, by a per-layer, per-pair threshold calibrated on data.

For a token whose top expert is e0, another chosen expert e is skipped when ``w_e < gamma(e0, e) * w_e0``
with ``gamma = gamma1 * gamma2``: gamma1 is the median of ``w_e / w_e0`` over calibration tokens (for top-k > 2
every non-top choice is compared with the top one), and ``gamma2(e0, e) = CKA(e0, e) / mean pairwise CKA``
(experts that compute alike are skipped more readily). Skipped slots are sorted past the last expert, so the
experts forward never computes them and the work really disappears (:func:`install_skipping`).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diep_lightning.calibration import BlockObservation, cka_matrix, expert_outputs, observe_blocks
from diep_lightning.families import MoEBlock, MoEFamily, get_family
from diep_lightning.families.base import HookGroup
from diep_lightning.pruning import SkipRecord, recorded_skipping

try:  # transformers' grouped matmul dispatch (CPU alignment and GPU capability fallbacks included)
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # a transformers without it: the stock experts forward with sentinel ids
    _grouped_linear = None


def gamma1(observation: BlockObservation) -> float:
    """Median over tokens (and non-top choices) of a chosen expert's weight relative to the top one."""
    weights = observation.weights.float()
    top = weights.max(dim=-1, keepdim=True).values.clamp_min(1e-20)
    ratios = weights / top
    mask = torch.ones_like(ratios, dtype=torch.bool)
    mask.scatter_(-1, weights.argmax(dim=-1, keepdim=True), False)
    return float(ratios[mask].median()) if mask.any() else 0.0


def calibrate_block(family: MoEFamily, block: MoEBlock, observation: BlockObservation) -> dict[str, Any]:
    """gamma1, the CKA matrix and the (N, N) thresholds of one block."""
    outputs = expert_outputs(family, block, observation)
    cka = cka_matrix(outputs)
    n = cka.shape[0]
    off_diagonal = cka[~torch.eye(n, dtype=torch.bool)]
    mean_cka = float(off_diagonal.mean()) if off_diagonal.numel() else 1.0
    g1 = gamma1(observation)
    gamma = g1 * cka / max(mean_cka, 1e-12)
    return {"gamma1": g1, "mean_cka": mean_cka, "gamma": gamma}


class Thresholds:
    """One layer's (N, N) skipping thresholds, cast once per device and dtype (not per routing call). A zero diagonal
    keeps each token's top slot (w_e0 < 0 * w_e0 never holds) without a scatter per call."""

    def __init__(self, gamma: torch.Tensor) -> None:
        self.gamma = gamma.clone().fill_diagonal_(0.0)
        self.cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, weights: torch.Tensor) -> torch.Tensor:
        key = (weights.device, weights.dtype)
        if key not in self.cast:
            self.cast[key] = self.gamma.to(weights.device, weights.dtype)
        return self.cast[key]


class _SkipState:
    """What one experts module needs to skip: its thresholds, the options, and device-side counters that are only
    updated while statistics are asked for."""

    def __init__(self, group: InstalledSkipping, gamma: torch.Tensor, renormalize: bool, sentinel: bool) -> None:
        self.group, self.renormalize, self.sentinel = group, renormalize, sentinel
        self.thresholds = Thresholds(gamma).like
        self.skipped: torch.Tensor | int = 0
        self.total = 0


def skipped_slots(thresholds: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, k) True where a chosen slot is skipped, ``w_e < gamma[e0, e] * w_e0``, and (tokens, 1) each token's
    top expert e0. A zero diagonal in ``thresholds`` keeps the top slot (chosen experts are distinct). Five small
    operations, each a kernel launch per layer and decode step; no host synchronisation."""
    w_top, top = w.max(dim=-1, keepdim=True)
    top_expert = idx.gather(-1, top)
    return w < thresholds[top_expert, idx] * w_top, top_expert


def skipped_weights(w: torch.Tensor, skip: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Routing weights with the skipped slots at 0, the survivors rescaled to the original sum if ``renormalize``."""
    new_w = w.masked_fill(skip, 0.0)
    if renormalize:
        new_w = new_w * (w.sum(-1, keepdim=True) / new_w.sum(-1, keepdim=True).clamp_min(1e-20))
    return new_w


def skip_mask(state: _SkipState, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`skipped_slots` with one experts module's thresholds."""
    return skipped_slots(state.thresholds(w), idx, w)[0]


@torch.no_grad()
def grouped_mm_skipping(experts: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                        skip: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts forward with the skipped slots sorted past the last expert, so the
    grouped matmuls never compute them. Their rows are left uninitialised and overwritten once, after the rows are
    put back in token order: four kernels on top of the unskipped forward where the stock sentinel path costs
    eleven, which is what a launch-bound decode step pays for. Inference only (autograd would see those rows)."""
    n, k = experts.num_experts, idx.shape[-1]
    ids, perm = torch.sort(torch.where(skip, n, idx).reshape(-1))
    rows = hidden[perm // k]
    # histc (not bincount) keeps the shapes static; CPU takes float input, CUDA int (as in transformers)
    counts = torch.histc(ids.float() if hidden.device.type in ("cpu", "mps") else ids.int(), bins=n, min=0, max=n - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    if experts.has_bias:
        ids = ids.clamp(max=n - 1)  # skipped rows take the last expert's bias: rows the matmuls leave out anyway

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        bias = getattr(experts, f"{name}_bias")[ids] if experts.has_bias else None
        return _grouped_linear(x, getattr(experts, name), offsets, bias=bias, is_transposed=experts.is_transposed)

    if experts.has_gate:
        out = experts._apply_gate(linear(rows, "gate_up_proj"))
    else:
        out = experts.act_fn(linear(rows, "up_proj"))
    out = linear(out, "down_proj")
    if getattr(experts, "has_post_expert_norm", False):  # older transformers lack the flag
        out = experts.post_expert_norm(out)
    ordered = torch.empty_like(out).index_copy_(0, perm, out).view(*idx.shape, -1)
    ordered.masked_fill_(skip.unsqueeze(-1), 0.0)
    return (ordered * w.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)


def _lean(module: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether :func:`grouped_mm_skipping` serves this call: transformers' grouped_mm kernel, no autograd."""
    return (module.diep_skip.group.lean and _grouped_linear is not None and not torch.is_grad_enabled()
            and hidden.dim() == 2
            and getattr(getattr(module, "config", None), "_experts_implementation", None) == "grouped_mm")


def _skipping_forward(self: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      *rest: Any) -> torch.Tensor:
    """The experts forward with skipping (bound to one experts module). With transformers' grouped_mm kernel at
    inference, :func:`grouped_mm_skipping`; otherwise skipped slots get the sentinel id N and weight 0, and the
    family's own experts implementation (grouped_mm, eager) leaves sentinel rows uncomputed.

    No host synchronisation: the mask, the rewrite and the optional counters all stay on the device."""
    stock = type(self).forward
    state: _SkipState = self.diep_skip
    if not state.group.enabled:
        return stock(self, hidden, top_k_index, top_k_weights, *rest)
    w, idx = top_k_weights, top_k_index
    skip = skip_mask(state, idx, w)
    if state.group.counting:
        state.skipped = state.skipped + skip.sum()
        state.total += skip.numel()
    if not rest and _lean(self, hidden):
        return grouped_mm_skipping(self, hidden, idx, skipped_weights(w, skip, True) if state.renormalize else w, skip)
    new_w = skipped_weights(w, skip, state.renormalize)
    if not state.sentinel:  # weight 0 only: exact, but the slot is still computed
        return stock(self, hidden, idx, new_w, *rest)
    previous = self._is_expert_parallel
    self._is_expert_parallel = True  # the experts implementations leave sentinel slots uncomputed
    try:
        return stock(self, hidden, idx.masked_fill(skip, self.num_experts), new_w, *rest)
    finally:
        self._is_expert_parallel = previous


class InstalledSkipping(HookGroup):
    """Skipping installed on a model's experts modules: ``remove()``, ``disabled()``, and statistics on request.

    Attributes:
        counting: while True, every call adds its skipped and total slots to :attr:`stats` (off by default: no
            work beyond the skipping itself).
        lean: whether :func:`grouped_mm_skipping` may serve (False: always the stock experts forward with sentinel
            ids, the same output; for comparisons).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counting = False
        self.lean = True
        self.modules: dict[int, nn.Module] = {}

    @property
    def stats(self) -> dict[int, list[int]]:
        """Per MoE block index: [skipped slots, all slots] counted while :attr:`counting` was on."""
        return {i: [int(m.diep_skip.skipped), m.diep_skip.total] for i, m in self.modules.items()}

    def clear_stats(self) -> None:
        for module in self.modules.values():
            module.diep_skip.skipped, module.diep_skip.total = 0, 0

    def remove(self) -> None:
        """Restore the stock experts forward everywhere."""
        for module in self.modules.values():
            del module.forward, module.diep_skip
        self.modules.clear()


def install_skipping(model: nn.Module, gammas: dict[int, torch.Tensor], renormalize: bool = False,
                     count: bool = False) -> InstalledSkipping:
    """Install skipping with the given (N, N) thresholds per MoE block (blocks without an entry are untouched).

    For each token the top-weighted chosen expert e0 always runs; another chosen expert e runs only if
    ``w_e >= gamma[e0, e] * w_e0``. ``count`` turns the statistics on from the start."""
    family = get_family(model)
    group = InstalledSkipping()
    group.counting = count
    implementation = getattr(model.config, "_experts_implementation", None)
    sentinel = family.eager_skips_sentinel or implementation not in (None, "eager")
    for block in family.blocks(model):
        if block.index not in gammas:
            continue
        if block.top_k < 2:
            raise ValueError(f"gammas: skipping needs top-k >= 2, block {block.index} routes top-{block.top_k}")
        module = block.experts
        if hasattr(module, "diep_skip"):
            raise ValueError(f"gammas: MoE block {block.index} already has skipping installed; remove it first")
        weight = next(module.parameters(), None)  # thresholds on the experts' device: no copy from the host per call
        gamma = torch.as_tensor(gammas[block.index]).to(weight.device if weight is not None else "cpu")
        module.diep_skip = _SkipState(group, gamma, renormalize, sentinel)
        module.forward = types.MethodType(_skipping_forward, module)
        group.modules[block.index] = module
    return group


@dataclass
class Skipping:
    """Calibrated skipping installed in a model.

    Attributes:
        gammas: per MoE block, the (N, N) thresholds.
        hooks: the installed skipping (``hooks.remove()`` uninstalls it).
        skipped_fraction: per MoE block, the share of chosen expert slots skipped on the calibration tokens.
        renormalize: whether surviving weights are rescaled when a slot is skipped.
        strength: the factor the calibrated thresholds were multiplied by (already in ``gammas``).
    """

    gammas: dict[int, torch.Tensor]
    hooks: Any
    skipped_fraction: dict[int, float] = field(default_factory=dict)
    renormalize: bool = False
    strength: float = 1.0

    def record(self) -> SkipRecord:
        """What the plan and the export's ``pruning.json`` keep so that loading re-installs it."""
        return SkipRecord(gammas={i: g.tolist() for i, g in self.gammas.items()}, renormalize=self.renormalize,
                          skipped_fraction=dict(self.skipped_fraction), strength=self.strength)


@torch.no_grad()
def calibrate_skipping(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_tokens: int = 4096,
                       renormalize: bool = False, strength: float = 1.0, share: float | None = None) -> Skipping:
    """Calibrate gammas on ``batches``, install skipping in ``model``, and measure the skipped share on them.

    ``strength`` multiplies every threshold: 1 is the paper's median rule; above 1 skips more (faster decoding, a
    quality trade-off the user measures), below 1 less. ``share`` instead picks the strength (bisection) at which
    that share of chosen slots is skipped on ``batches``: the same speed/quality point on models whose routers
    differ."""
    if not strength > 0:
        raise ValueError(f"strength: must be > 0, got {strength!r}")
    if share is not None and not 0 < share < 1:
        raise ValueError(f"share: must lie in (0, 1), got {share!r}")
    batches = list(batches)
    family = get_family(model)
    observations = observe_blocks(model, family, batches, max_tokens)
    base = {b.index: calibrate_block(family, b, observations[b.index])["gamma"] for b in family.blocks(model)}

    def install(factor: float) -> tuple[InstalledSkipping, dict[int, float], float]:
        """Skipping at ``factor`` x the calibrated thresholds, and the share it skips on ``batches`` (per block, mean)."""
        hooks = install_skipping(model, {i: factor * g for i, g in base.items()}, renormalize=renormalize, count=True)
        observe_blocks(model, family, batches, None)
        skipped = {i: s[0] / max(1, s[1]) for i, s in hooks.stats.items()}
        hooks.counting = False
        hooks.clear_stats()
        return hooks, skipped, sum(skipped.values()) / max(1, len(skipped))

    if share is not None:
        low, high = 0.0, 1.0
        while True:  # grow until the share is reached (every non-top slot skipped is the most there is)
            hooks, _, reached = install(high)
            hooks.remove()
            if reached >= share:
                break
            if high > 1e6:
                raise ValueError(f"share: {share:g} is more than skipping can skip here (at most {reached:.3f}: "
                                 "each token's top expert always runs)")
            low, high = high, high * 2
        for _ in range(20):  # each step is a forward over the batches: stop within 0.002 of the share
            if reached - share < 0.002:
                break
            mid = (low + high) / 2
            hooks, _, got = install(mid)
            hooks.remove()
            if got >= share:
                high, reached = mid, got
            else:
                low = mid
        strength = high
    hooks, skipped, _ = install(strength)
    model.diep_skipping = hooks
    return Skipping(gammas={i: strength * g for i, g in base.items()}, hooks=hooks, skipped_fraction=skipped,
                    renormalize=renormalize, strength=float(strength))


def install_skipping_from_record(model: nn.Module, record: dict[str, Any]) -> Any:
    """Re-install the skipping recorded in an export's ``pruning.json`` (None when it records none)."""
    skipping = recorded_skipping(record.get("plan") or {})
    if skipping is None:
        return None
    gammas = {i: torch.tensor(g) for i, g in skipping.gammas.items()}
    group = install_skipping(model, gammas, renormalize=skipping.renormalize)
    model.diep_skipping = group
    return group
