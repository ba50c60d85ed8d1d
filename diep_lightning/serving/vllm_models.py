"""vLLM model classes for non-uniform diep_lightning exports, and the plugin hook that registers them.

vLLM builds every decoder layer's MoE from one expert count in the config. Each class here is vLLM's own model
class with one change: while layer i is built (through the model file's ``make_layers``), the config's expert
count reads ``num_experts_per_layer[i]``, so every layer gets a fused-MoE module (router, expert tensors) of its
own size; weights then load with vLLM's own loader. Registered through the ``vllm.general_plugins`` entry point, so engine worker processes get it too.
"""

from __future__ import annotations

import importlib
from typing import Any

from diep_lightning.serving.plan import EXPORTED, SERVED, architecture, check_parallelism, experts_per_layer, layer_index


def _per_layer_class(model_type: str) -> type:
    module_name, causal_name, count_attr = SERVED[model_type]
    module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    base, make_layers = getattr(module, causal_name), module.make_layers

    class DiEPModel(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            model_config = vllm_config.model_config
            configs = list({id(c): c for c in (model_config.hf_config, getattr(model_config, "hf_text_config", None))
                            if c is not None}.values())
            counts = experts_per_layer(model_config.hf_config)
            parallel = vllm_config.parallel_config
            ep = (parallel.tensor_parallel_size * parallel.data_parallel_size
                  if getattr(parallel, "enable_expert_parallel", False) else 1)
            check_parallelism(counts, getattr(model_config.hf_config, "num_experts_per_tok", None), ep,
                              bool(getattr(parallel, "enable_eplb", False)))

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
            try:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            finally:
                module.make_layers = make_layers

    DiEPModel.__name__ = DiEPModel.__qualname__ = architecture(model_type)
    return DiEPModel


def _refusing_class(model_type: str) -> type:
    class Refused:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError(
                f"architectures: diep_lightning's vLLM plugin serves non-uniform exports of {', '.join(SERVED)}; "
                f"{model_type} is not supported yet; export it with --prune.mode=uniform to serve it with stock vLLM")

    Refused.__name__ = architecture(model_type)
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

    supported = set(ModelRegistry.get_supported_archs())
    for model_type in EXPORTED:
        name = architecture(model_type)
        if name not in supported:
            ModelRegistry.register_model(name, f"diep_lightning.serving.vllm_models:{name}")
