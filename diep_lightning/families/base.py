"""The one interface through which diep_lightning touches a transformers MoE model.

Every transformers 5.x MoE family builds its sparse block the same way: a router returning
``(router_logits, top_k_weights, top_k_index)`` and an ``experts`` module called as
``experts(hidden_states, top_k_index, top_k_weights)`` that holds fused 3-D expert tensors. The families
differ in small ways (attribute names, routing rule, biases, shared experts, grouped routers, transposed
tensors). :class:`MoEFamily` implements the common behaviour once, against the experts module's own
forward, so that a family file only states what is different. Nothing outside ``families/`` knows how a
family is built.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from diep_lightning.families.hooks import HookGroup, _AddToLinear

#: Logit given to experts masked out of routing: exp() of it underflows to exactly 0 in fp32/bf16, and it
#: stays finite so that routers that do arithmetic on logits (PhiMoE's sparsemixer) produce no NaN.
MASK_LOGIT = -1e30


@dataclass
class MoEBlock:
    """One sparse MoE block of a model, as the rest of the project sees it.

    Attributes:
        index: position among the model's MoE blocks (0..L-1), the ``l`` of the method's equations.
        layer_idx: index of the decoder layer that holds the block (differs when dense layers come first).
        module: the sparse block (``layer.mlp`` or ``layer.block_sparse_moe``).
        router: the module that computes routing logits and the top-k choice.
        experts: the fused experts module.
        family: the family adapter that knows how to handle this block.
    """

    index: int
    layer_idx: int
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    family: MoEFamily

    @property
    def num_experts(self) -> int:
        """Number of routed experts the block has now (after any removal)."""
        return int(self.experts.num_experts)

    @property
    def top_k(self) -> int:
        """Number of experts each token is routed to."""
        return int(self.family.block_top_k(self))


# Scale provider: given a block's index, the (N_l,) tensor of multipliers for its routing weights, or None.
ScaleProvider = Callable[[int], "torch.Tensor | None"]


def weighted_average(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i weights[i] * stacked[i]``, accumulated in float32, in ``stacked``'s dtype (merging's average)."""
    w = torch.tensor(list(weights), dtype=torch.float32, device=stacked.device)
    return (stacked.float() * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(0).to(stacked.dtype)


class MoEFamily:
    """Adapter for one transformers MoE family. Subclasses set the class attributes and override only what
    their family does differently.

    Class attributes:
        model_types: ``config.model_type`` values handled by this adapter.
        block_attr: attribute of a decoder layer that holds its MoE block.
        router_attr: attribute of the block that holds the router.
        num_experts_config_attr: config attribute with the routed-expert count (for exports).
        has_shared_experts: whether the block adds always-on shared experts to the routed output.
        max_top_k: largest top-k the family's routing rule supports (None: no limit).
        eager_skips_sentinel: whether the eager experts forward leaves the sentinel id N uncomputed.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    block_attr: ClassVar[str] = "mlp"
    router_attr: ClassVar[str] = "gate"
    num_experts_config_attr: ClassVar[str] = "num_local_experts"
    has_shared_experts: ClassVar[bool] = False
    max_top_k: ClassVar[int | None] = None
    #: the family's eager experts forward skips the sentinel expert id N (adaptive skipping relies on it)
    eager_skips_sentinel: ClassVar[bool] = True
    #: parameter groups router calibration can train in this family (see :meth:`calibration_parameters`)
    calibration_groups: ClassVar[tuple[str, ...]] = ("router", "norm", "attention_norm")
    #: where each expert tensor keeps its hidden units, for aligning experts before merging: per tensor name,
    #: ``(dim of one expert's slice that runs over units, contiguous chunks along it, interleaved entries per
    #: unit)``; the fused default is gate/up stacked as (2I, H) and down as (H, I). A tensor not named has no unit
    #: axis (an output bias). None: this family's experts cannot be aligned.
    unit_layout: ClassVar[dict[str, tuple[int, int, int]] | None] = {"gate_up_proj": (0, 2, 1),
                                                                      "down_proj": (1, 1, 1)}

    # ------------------------------------------------------------------ discovery
    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The decoder layers of a ``*ForCausalLM`` (or bare ``*Model``) of this family."""
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise ValueError(f"model: cannot find decoder layers on {type(model).__name__} (expected .model.layers)")
        return layers

    def blocks(self, model: nn.Module) -> list[MoEBlock]:
        """The model's sparse MoE blocks in order; dense layers (DeepSeek's first layers, Qwen's
        ``mlp_only_layers``) are skipped."""
        found: list[MoEBlock] = []
        for layer_idx, layer in enumerate(self.decoder_layers(model)):
            module = getattr(layer, self.block_attr, None)
            if module is None or not hasattr(module, "experts"):
                continue
            found.append(
                MoEBlock(
                    index=len(found),
                    layer_idx=layer_idx,
                    module=module,
                    router=getattr(module, self.router_attr),
                    experts=module.experts,
                    family=self,
                )
            )
        return found

    def block_top_k(self, block: MoEBlock) -> int:
        """Top-k of a block, read from its router."""
        return int(block.router.top_k)

    # ------------------------------------------------------------------ scaling (the DiEP search)
    def install_scaling(self, blocks: Sequence[MoEBlock], provider: ScaleProvider) -> HookGroup:
        """Multiply each chosen expert's routing weight by a per-expert factor, differentiably.

        A forward pre-hook on each block's ``experts`` replaces ``top_k_weights`` by
        ``top_k_weights * scale[top_k_index]``, where ``scale = provider(block.index)``. Which experts are
        chosen is unchanged; the block output becomes ``sum_i scale_i w_i E_i(x)`` exactly as in DiEP's
        eq. (5), and gradients flow into ``scale``. Shared experts are not scaled.

        Returns:
            The hook group; ``group.disabled()`` runs the model unscaled (the teacher).
        """
        group = HookGroup()
        for block in blocks:
            group.handles.append(
                block.experts.register_forward_pre_hook(self._scaling_hook(block.index, provider, group))
            )
        return group

    @staticmethod
    def _scaling_hook(index: int, provider: ScaleProvider, group: HookGroup) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not group.enabled:
                return None
            scale = provider(index)
            if scale is None:
                return None
            hidden, top_k_index, top_k_weights = args[0], args[1], args[2]
            scaled = top_k_weights * scale.to(device=top_k_weights.device, dtype=top_k_weights.dtype)[top_k_index]
            return (hidden, top_k_index, scaled, *args[3:])

        return hook

    # ------------------------------------------------------------------ observing
    def expert_outputs(self, block: MoEBlock, hidden: torch.Tensor, expert_ids: Sequence[int] | None = None,
                       chunk_tokens: int = 4096) -> torch.Tensor:
        """Each expert's own output ``E_i(x)`` on the given tokens, unweighted.

        Runs the model's own experts forward with every token sent to one expert at weight 1, so the
        result is exactly what that expert contributes inside the model (gated, biased, transposed or not).

        Args:
            block: the MoE block.
            hidden: block inputs, shape (T, H) (or (..., H), flattened).
            expert_ids: experts to evaluate (default: all).
            chunk_tokens: tokens per call, to bound memory.

        Returns:
            Tensor of shape (len(expert_ids), T, H).
        """
        hidden = hidden.reshape(-1, hidden.shape[-1])
        ids = list(range(block.num_experts)) if expert_ids is None else list(expert_ids)
        forward = type(block.experts).forward  # the class forward: bypasses hooks installed on the instance
        outs = []
        for e in ids:
            pieces = []
            for start in range(0, hidden.shape[0], chunk_tokens):
                x = hidden[start:start + chunk_tokens]
                index = torch.full((x.shape[0], 1), e, dtype=torch.long, device=x.device)
                weight = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
                pieces.append(forward(block.experts, x, index, weight))
            outs.append(torch.cat(pieces, dim=0))
        return torch.stack(outs, dim=0)

    def install_routing_capture(self, blocks: Sequence[MoEBlock],
                                sink: Callable[[MoEBlock, torch.Tensor, torch.Tensor, torch.Tensor], None]
                                ) -> HookGroup:
        """Call ``sink(block, hidden, top_k_index, top_k_weights)`` each time a block routes tokens.

        This is where baselines get routing frequencies and weights, and calibration gets block inputs.
        """
        group = HookGroup()
        for block in blocks:
            def hook(module: nn.Module, args: tuple[Any, ...], _block: MoEBlock = block) -> None:
                if group.enabled:
                    sink(_block, args[0], args[1], args[2])
            group.handles.append(block.experts.register_forward_pre_hook(hook))
        return group

    # ------------------------------------------------------------------ masking (an exact in-memory emulation)
    @contextlib.contextmanager
    def masked_routing(self, block: MoEBlock, expert_ids: Sequence[int]) -> Iterator[None]:
        """Route as if ``expert_ids`` did not exist in ``block`` (the reference that removal must match).

        Default: add ``MASK_LOGIT`` to those experts' router logits while the router runs.
        """
        mask = torch.zeros(block.num_experts)
        mask[list(expert_ids)] = MASK_LOGIT
        weight = self.router_weight(block)
        mode_holder: dict[str, _AddToLinear] = {}

        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            mode_holder["mode"] = _AddToLinear(weight, mask.to(weight.device))
            mode_holder["mode"].__enter__()

        def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            mode_holder.pop("mode").__exit__(None, None, None)

        handles = [block.router.register_forward_pre_hook(pre), block.router.register_forward_hook(post)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def router_weight(self, block: MoEBlock) -> torch.Tensor:
        """The router's (N, H) weight matrix."""
        return block.router.weight

    # ------------------------------------------------------------------ removal and merging
    def _expert_tensors(self, block: MoEBlock) -> dict[str, nn.Parameter]:
        """Every parameter of the experts module indexed by expert along dim 0."""
        n = block.num_experts
        return {name: p for name, p in block.experts.named_parameters(recurse=False) if p.shape[0] == n}

    def _router_tensors(self, block: MoEBlock) -> dict[str, torch.Tensor]:
        """Router parameters and buffers indexed by expert along dim 0 (weight rows, biases)."""
        n = block.num_experts
        tensors: dict[str, torch.Tensor] = {}
        for name, p in block.router.named_parameters(recurse=False):
            if p.shape and p.shape[0] == n:
                tensors[name] = p
        for name, b in block.router.named_buffers(recurse=False):
            if b is not None and b.shape and b.shape[0] == n:
                tensors[name] = b
        return tensors

    def remove_experts(self, block: MoEBlock, expert_ids: Sequence[int]) -> list[int]:
        """Physically delete experts from a block: router rows, routing biases, expert tensors, counts.

        Args:
            block: the MoE block (modified in place).
            expert_ids: current indices of the experts to delete.

        Returns:
            The original positions (in the block's current numbering) of the kept experts, in their new
            order.

        Raises:
            ValueError: if fewer than top-k experts would remain, or an id is out of range.
        """
        n = block.num_experts
        drop = sorted(set(int(e) for e in expert_ids))
        if any(e < 0 or e >= n for e in drop):
            raise ValueError(f"expert_ids: indices must be in [0, {n}) for block {block.index}, got {drop}")
        keep = [e for e in range(n) if e not in set(drop)]
        if len(keep) < block.top_k:
            raise ValueError(
                f"expert_ids: removing {len(drop)} of {n} experts from block {block.index} leaves {len(keep)}, "
                f"fewer than its top-k={block.top_k}; remove at most {n - block.top_k}"
            )
        if not drop:
            return keep
        self._before_removal(block, keep)
        index = torch.tensor(keep, dtype=torch.long)
        for module, tensors in ((block.experts, self._expert_tensors(block)), (block.router, self._router_tensors(block))):
            for name, tensor in tensors.items():
                sliced = tensor.detach().index_select(0, index.to(tensor.device)).clone()
                if isinstance(tensor, nn.Parameter):
                    setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
                else:
                    module._buffers[name] = sliced
        self._set_expert_count(block, len(keep))
        return keep

    def _before_removal(self, block: MoEBlock, keep: list[int]) -> None:
        """Hook for families whose routing structure depends on the expert count (grouped routers)."""

    def _set_expert_count(self, block: MoEBlock, n: int) -> None:
        """Update every per-module count that the forward reads."""
        for module in (block.module, block.router, block.experts):
            if hasattr(module, "num_experts"):
                module.num_experts = n
        if hasattr(block.router, "out_features"):  # routers that subclass nn.Linear
            block.router.out_features = n

    def merge_experts(self, block: MoEBlock, survivor: int, members: Sequence[int], weights: Sequence[float]) -> None:
        """Overwrite ``survivor``'s weights by the weighted sum of the weights of ``members``.

        ``members`` includes the survivor; ``weights`` align with ``members`` and should sum to 1. The
        survivor keeps its own router row. Removing the other members is a separate call
        (:meth:`remove_experts`), so weight 1 on the survivor followed by removal equals plain removal.
        """
        if len(members) != len(weights):
            raise ValueError(f"weights: expected {len(members)} merge weights (one per member), got {len(weights)}")
        if survivor not in members:
            raise ValueError(f"members: the survivor {survivor} must be one of the merged members {list(members)}")
        with torch.no_grad():
            for tensor in self._expert_tensors(block).values():
                tensor[survivor].copy_(weighted_average(tensor[list(members)], weights))

    # ------------------------------------------------------------------ router calibration
    def calibration_parameters(self, model: nn.Module, block: MoEBlock, group: str) -> dict[str, nn.Parameter]:
        """The parameters of one block that router calibration trains for ``group``; none changes a shape.

        "router": the router's own parameters (weight rows and, where the family has one, the logit bias; a
        selection-only bias such as DeepSeek-V3's ``e_score_correction_bias`` is a buffer that no gradient reaches,
        so it stays as the search left it). "norm": the norm in front of the MoE block (its input scale);
        "attention_norm": the norm in front of the same layer's attention.
        """
        self.check_calibration_group(group)
        if group == "router":
            return dict(block.router.named_parameters(recurse=False))
        if group in ("norm", "attention_norm"):
            layer = self.decoder_layers(model)[block.layer_idx]
            norm = layer.post_attention_layernorm if group == "norm" else layer.input_layernorm
            return dict(norm.named_parameters(recurse=False))
        return self._calibration_parameters(block, group)

    def check_calibration_group(self, group: str) -> None:
        """Refuse, in one line, a group this family does not have."""
        if group not in self.calibration_groups:
            raise ValueError(f"groups: {type(self).__name__} has no {group!r} parameters to calibrate; it has "
                             f"{list(self.calibration_groups)}")

    def _calibration_parameters(self, block: MoEBlock, group: str) -> dict[str, nn.Parameter]:
        """Family-specific groups (e.g. a shared expert's gate)."""
        raise ValueError(f"groups: {type(self).__name__} does not implement the {group!r} group")

    # ------------------------------------------------------------------ config for exports
    def expert_counts_to_config(self, config: Any, counts: Sequence[int]) -> None:
        """Record per-layer routed-expert counts in a config (used by exports)."""
        config.diep_num_experts_per_layer = list(int(c) for c in counts)

    def config_experts(self, config: Any) -> tuple[int | None, int | None]:
        """(routed experts per MoE layer, top-k) as the config states them, before any weight is read."""
        n = getattr(config, self.num_experts_config_attr, None)
        k = getattr(config, "num_experts_per_tok", None)
        return (n if isinstance(n, int) else None), (k if isinstance(k, int) else None)

    def check_config(self, config: Any) -> None:
        """Refuse a config whose routing cannot work (more experts per token than experts)."""
        n, k = self.config_experts(config)
        if n is not None and k is not None and not 1 <= k <= n:
            raise ValueError(f"model_name_or_path: the config routes each token to num_experts_per_tok={k} of "
                             f"{self.num_experts_config_attr}={n} experts; it needs 1 <= top-k <= experts; fix "
                             "config.json")

    def check_model(self, model: nn.Module) -> None:
        """Family-specific checks before a search (e.g. a top-k the routing rule cannot express)."""
        if self.max_top_k is not None:
            for block in self.blocks(model):
                if block.top_k > self.max_top_k:
                    warnings.warn(f"{type(self).__name__}: block {block.index} has top-{block.top_k}, "
                                  f"the family's routing supports top-{self.max_top_k}", stacklevel=2)
