"""vLLM model classes for non-uniform diep_lightning exports, and the plugin hook that registers them.

vLLM builds every decoder layer's MoE from one expert count in the config. Each class here is vLLM's own model
class with one change: while layer i is built (through the model file's ``make_layers``), the config's expert
count reads ``num_experts_per_layer[i]``, so every layer gets a fused-MoE module (router, expert tensors) of its
own size; weights then load with vLLM's own loader. Registered through the ``vllm.general_plugins`` entry point, so engine worker processes get it too.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diep_lightning.loading import check_weight_files
from diep_lightning.serving.plan import (EXPORTED, PADDABLE, SERVED, architecture, check_parallelism,
                                        check_router_rows, layer_index, pad_attention_weights, padded_head_size,
                                        served_counts)
from diep_lightning.serving.skipping import SWITCH, ServedSkipping, layer_thresholds, redirect_skipped
from diep_lightning.skipping import Thresholds


def _supported_head_sizes() -> list[int] | None:
    """Head sizes of the attention kernel this platform uses (CPU only: the GPU kernels take any size these
    families have)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.get_supported_head_sizes()


def _padded_attention_class(module: Any, head_dim: int, padded: int) -> type:
    """The family's attention with every head zero-padded from ``head_dim`` to ``padded``: same scores (scaled by
    the model's own head size), same outputs, a shape the kernel has. Rotary embedding covers the first
    ``head_dim`` dimensions, as in the model."""
    import torch.nn as nn

    class PaddedAttention(module.Qwen2MoeAttention):
        def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, rope_parameters: Any = None,
                     max_position_embeddings: int = 8192, cache_config: Any = None, quant_config: Any = None,
                     prefix: str = "", dual_chunk_attention_config: Any = None) -> None:
            if dual_chunk_attention_config:
                raise ValueError("head_dim: padding the attention heads does not support dual-chunk attention")
            nn.Module.__init__(self)
            tp_size = module.get_tensor_model_parallel_world_size()
            self.hidden_size, self.total_num_heads, self.total_num_kv_heads = hidden_size, num_heads, num_kv_heads
            self.num_heads, self.num_kv_heads = num_heads // tp_size, max(1, num_kv_heads // tp_size)
            self.head_dim = padded
            self.q_size, self.kv_size = self.num_heads * padded, self.num_kv_heads * padded
            self.scaling = head_dim ** -0.5
            self.max_position_embeddings = max_position_embeddings
            self.dual_chunk_attention_config = None
            self.qkv_proj = module.QKVParallelLinear(hidden_size, padded, num_heads, num_kv_heads, bias=True,
                                                     quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
            self.o_proj = module.RowParallelLinear(num_heads * padded, hidden_size, bias=False,
                                                   quant_config=quant_config, prefix=f"{prefix}.o_proj")
            self.rotary_emb = module.get_rope(padded, max_position=max_position_embeddings,
                                              rope_parameters={**(rope_parameters or {}), "rope_dim": head_dim})
            self.attn = module.Attention(self.num_heads, padded, self.scaling, num_kv_heads=self.num_kv_heads,
                                         cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn")

    return PaddedAttention


def _skipping_select(select: Any, thresholds: Thresholds, renormalize: bool, state: ServedSkipping,
                     layer: int) -> Any:
    def select_experts(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        topk_weights, topk_ids = select(*args, **kwargs)
        return redirect_skipped(thresholds.like(topk_weights), topk_weights, topk_ids, renormalize, state, layer)

    return select_experts


def fused_moe_layers(model: Any) -> Any:
    """``(decoder layer index, module)`` of each module of ``model`` that routes a fused MoE (a router and a layer
    name)."""
    from vllm.model_executor.layers.fused_moe.router.fused_moe_router import FusedMoERouter

    for module in model.modules():
        if isinstance(getattr(module, "router", None), FusedMoERouter) and isinstance(
                getattr(module, "layer_name", None), str):
            yield layer_index(module.layer_name), module


def local_record(model_config: Any) -> dict[str, Any] | None:
    """A local export's ``pruning.json``, checked against its config (one line naming the file or field), or None
    for a model that is not a local folder with one."""
    from diep_lightning.export_dir import PRUNING_FILE
    from diep_lightning.record import read_pruning_record

    folder = Path(str(model_config.model)).expanduser()
    if not (folder / PRUNING_FILE).is_file():
        return None
    return read_pruning_record(folder)


def install_skipping(model: Any, model_config: Any, counts: list[int]) -> ServedSkipping:
    """Install the skipping an export's ``pruning.json`` records on each fused-MoE layer's router; returns its
    :class:`ServedSkipping` (no layers when none is recorded or it is off: ``hf_overrides={"diep_skipping": False}``).

    Raises:
        ValueError: one line when the recorded layers are not all found, or a layer's kernel routes by itself
            (a monolithic fused-MoE kernel takes router logits, so the recorded skipping could not apply).
    """
    from vllm.logger import init_logger
    from vllm.transformers_utils.repo_utils import get_hf_file_to_dict

    from diep_lightning.export_dir import PRUNING_FILE

    state = ServedSkipping()
    if getattr(model_config.hf_config, SWITCH, True) is False:
        return state
    record = local_record(model_config)
    if record is None:
        record = get_hf_file_to_dict(PRUNING_FILE, model_config.model, getattr(model_config, "revision", None))
    thresholds, renormalize = layer_thresholds(record, counts)
    installed = []
    for layer, module in fused_moe_layers(model):
        if layer not in thresholds:
            continue
        if getattr(module, "is_monolithic", False):
            raise ValueError(f"{SWITCH}: the fused-MoE kernel of layer {layer} routes by itself, so the recorded "
                             f"skipping cannot apply; serve with --moe-backend triton to keep it, or with "
                             f"hf_overrides={{'{SWITCH}': False}} to serve without it")
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        module.router.select_experts = _skipping_select(module.router.select_experts,
                                                        Thresholds(thresholds[layer].to(device)), renormalize, state,
                                                        layer)
        installed.append(layer)
    missing = sorted(set(thresholds) - set(installed))
    if missing:
        raise ValueError(f"{PRUNING_FILE}: skipping is recorded for decoder layers {missing}, where the plugin found no "
                         f"fused-MoE router; serve with hf_overrides={{'{SWITCH}': False}}")
    if installed:
        init_logger(__name__).info("diep_lightning: adaptive expert skipping on in %d MoE layers", len(installed))
    state.layers = sorted(installed)
    return state


def check_export(model_config: Any, model_type: str) -> list[int]:
    """Each decoder layer's expert count, once the config and ``pruning.json`` agree (one line naming the field or
    file otherwise); runs in vLLM's front end before any engine starts, and again where the model is built."""
    if model_type not in SERVED:
        raise ValueError(f"architectures: diep_lightning's vLLM plugin serves non-uniform exports of "
                         f"{', '.join(SERVED)}; {model_type} is not supported yet; export it with --prune.mode=uniform "
                         "to serve it with stock vLLM")
    counts = served_counts(model_config.hf_config, SERVED[model_type][2])
    record = local_record(model_config)  # its one-line refusal of a damaged or edited export
    if record is not None and getattr(model_config.hf_config, SWITCH, True) is not False:
        layer_thresholds(record, counts)  # recorded skipping that fits the layers
    folder = Path(str(model_config.model)).expanduser()
    if folder.is_dir():
        check_weight_files(folder)
    return counts


def check_serving(vllm_config: Any, counts: list[int]) -> None:
    """Refuse parallel settings the per-layer counts cannot take (one line naming the setting)."""
    parallel = vllm_config.parallel_config
    ep = (parallel.tensor_parallel_size * parallel.data_parallel_size
          if getattr(parallel, "enable_expert_parallel", False) else 1)
    check_parallelism(counts, getattr(vllm_config.model_config.hf_config, "num_experts_per_tok", None), ep,
                      bool(getattr(parallel, "enable_eplb", False)))


class ExportRefused(RuntimeError):
    """An export the plugin will not serve, raised from ``LLM(...)`` with the one line as its message (not a
    ValueError: vLLM's config validation would bury that in its own error)."""


def vllm_command_line(argv: list[str] | None = None) -> bool:
    """Whether this process is vLLM's own command line (``vllm serve``, ``python -m vllm.entrypoints...``), where a
    refusal ends the process with one line; inside a user's Python (``LLM(...)``) it is an exception instead."""
    first = (sys.argv if argv is None else argv)[:1]
    if not first:
        return False
    path = Path(first[0])
    return path.name == "vllm" or "vllm/entrypoints" in path.as_posix()


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """A refusal as vLLM's command line's last and only line, or as :class:`ExportRefused` from ``LLM(...)``."""
    try:
        yield
    except ValueError as err:
        if vllm_command_line():  # a server: the one line is all its user needs (no engine runs yet)
            raise SystemExit(f"error: {err}") from None
        raise ExportRefused(str(err)) from None


def _front_end_check(model_type: str) -> type:
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``), run while the engine's config is made: a bad
    export is refused there, in the calling process, before an engine process starts and prints its traceback."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class Check(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config: Any) -> None:
            with _one_line():
                check_export(model_config, model_type)

        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            """The parallel settings only: the export itself was checked with the model config just before."""
            with _one_line():
                counts = served_counts(vllm_config.model_config.hf_config, SERVED[model_type][2])
                check_serving(vllm_config, counts)

    Check.__name__ = architecture(model_type)
    return Check


def _per_layer_class(model_type: str) -> type:
    module_name, causal_name, count_attr = SERVED[model_type]
    module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    base, make_layers = getattr(module, causal_name), module.make_layers

    class DiEPModel(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            model_config = vllm_config.model_config
            hf = model_config.hf_config
            head_dim = padded = None
            if model_type in PADDABLE:  # a head size the attention kernel lacks is served zero-padded
                head_dim = hf.hidden_size // hf.num_attention_heads
                padded = padded_head_size(head_dim, _supported_head_sizes())
            configs = list({id(c): c for c in (model_config.hf_config, getattr(model_config, "hf_text_config", None))
                            if c is not None}.values())
            counts = check_export(model_config, model_type)
            check_serving(vllm_config, counts)

            def build_layer(layer_fn: Any, prefix: str) -> Any:
                count = counts[layer_index(prefix)]
                saved = [getattr(c, count_attr) for c in configs]
                try:
                    if count:
                        for c in configs:
                            setattr(c, count_attr, count)
                    return layer_fn(prefix=prefix)
                finally:
                    for c, value in zip(configs, saved):
                        setattr(c, count_attr, value)

            def per_layer_make_layers(num_layers: int, layer_fn: Any, *args: Any, **kwargs: Any) -> Any:
                return make_layers(num_layers, lambda prefix: build_layer(layer_fn, prefix), *args, **kwargs)

            module.make_layers = per_layer_make_layers  # every family builds its decoder layers through it
            attention = getattr(module, "Qwen2MoeAttention", None)
            if padded != head_dim:
                module.Qwen2MoeAttention = _padded_attention_class(module, head_dim, padded)
            try:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            finally:
                module.make_layers = make_layers
                if attention is not None:
                    module.Qwen2MoeAttention = attention
            self._head_dim, self._padded, self._counts = head_dim, padded, counts
            self.diep_skipping = install_skipping(self, model_config, counts)

        def load_weights(self, weights: Any) -> Any:
            weights = check_router_rows(weights, self._counts)
            if self._padded != self._head_dim:
                weights = pad_attention_weights(weights, self._head_dim, self._padded)
            return super().load_weights(weights)

    DiEPModel.__name__ = DiEPModel.__qualname__ = architecture(model_type)
    return DiEPModel


def _refusing_class(model_type: str) -> type:
    """A class vLLM's registry inspects as a text-generation model (a stock one's subclass), so that the plugin's
    config hook, not vLLM's "does not support --runner generate", is what refuses a family it does not serve."""
    from vllm.model_executor.models.mixtral import MixtralForCausalLM

    class Refused(MixtralForCausalLM):
        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            check_export(vllm_config.model_config, model_type)  # refuses: the family is not served

    Refused.__name__ = Refused.__qualname__ = architecture(model_type)
    return Refused


def __getattr__(name: str) -> type:
    """``diep_lightning.serving.vllm_models:DiEP<Class>``: built on first use (vLLM imports it lazily)."""
    for model_type in EXPORTED:
        if architecture(model_type) == name:
            cls = _per_layer_class(model_type) if model_type in SERVED else _refusing_class(model_type)
            globals()[name] = cls
            return cls
    raise AttributeError(name)


def register() -> None:
    """The ``vllm.general_plugins`` hook: make vLLM resolve every ``DiEP*`` architecture to this module."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    supported = set(ModelRegistry.get_supported_archs())
    for model_type in EXPORTED:
        name = architecture(model_type)
        if name not in supported:
            ModelRegistry.register_model(name, f"diep_lightning.serving.vllm_models:{name}")
        MODELS_CONFIG_MAP.setdefault(name, _front_end_check(model_type))
