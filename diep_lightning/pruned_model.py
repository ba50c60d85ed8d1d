"""Rebuilding a model whose MoE layers have different expert counts, so that its weights load.

transformers builds every layer from one ``num_experts`` in the config, so a non-uniformly pruned checkpoint
cannot load with plain ``from_pretrained`` (and ``ignore_mismatched_sizes=True`` would silently
re-initialise weights). An export therefore records each layer's layout in ``config.diep_layers`` and ships
a small modeling file whose class shrinks the freshly built layers to that layout before the weights load.
The source of :func:`shrink_to_layout` below is copied verbatim into that file, so it may only use torch
(no diep_lightning import): the export must load on machines without this package.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

import torch


def shrink_to_layout(model: torch.nn.Module, layers_spec: list, block_attr: str, router_attr: str) -> None:
    """Resize each MoE block of a freshly built model to the expert count recorded for its layer.

    ``layers_spec[i]`` is None for a layer left as built, else a dict with ``num_experts`` and optionally
    ``num_group`` / ``topk_group`` (grouped routers). Tensors indexed by expert on dim 0 are cut to the
    recorded count (their values are about to be overwritten by the checkpoint), and every count the forward
    reads is updated.
    """
    base = getattr(model, "model", model)
    for layer, spec in zip(base.layers, layers_spec):
        if not spec:
            continue
        block = getattr(layer, block_attr)
        router = getattr(block, router_attr)
        old, new = int(block.experts.num_experts), int(spec["num_experts"])
        for module in (block.experts, router):
            for name, param in list(module.named_parameters(recurse=False)):
                if param.dim() > 0 and param.shape[0] == old:
                    setattr(module, name, torch.nn.Parameter(param.data[:new].clone(),
                                                             requires_grad=param.requires_grad))
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.dim() > 0 and buf.shape[0] == old:
                    module._buffers[name] = buf[:new].clone()
        for module in (block, router, block.experts):
            if hasattr(module, "num_experts"):
                module.num_experts = new
        if hasattr(router, "out_features"):
            router.out_features = new
        if spec.get("num_group") is not None:
            router.num_group = int(spec["num_group"])
            router.topk_group = int(spec["topk_group"])


_MODELING_TEMPLATE = '''"""Loader for a DiEP-pruned {base_class} whose MoE layers keep different numbers of experts.

Written by diep_lightning. `AutoModelForCausalLM.from_pretrained(<this dir>, trust_remote_code=True)` builds
the stock {base_class}, shrinks each MoE layer to the expert count in `config.diep_layers`, then loads the
weights. Needs only torch and transformers; adaptive skipping recorded in `pruning.json` is re-installed when
diep_lightning is importable (a warning says so otherwise).
"""

import json
import os
import warnings

import torch
from {base_module} import {base_class} as _Base

BLOCK_ATTR = {block_attr!r}
ROUTER_ATTR = {router_attr!r}


{shrink_source}

def install_recorded_skipping(model, path):
    """Re-install the adaptive expert skipping recorded in `pruning.json` (needs diep_lightning); warn, never
    drop it silently, when the package is missing."""
    record_path = os.path.join(str(path), "pruning.json")
    if not os.path.isfile(record_path):
        return
    with open(record_path, encoding="utf-8") as fh:
        record = json.load(fh)
    plan = record.get("plan") or {{}}
    if not (plan.get("skipping") or (plan.get("extra") or {{}}).get("skip_gammas")):
        return
    try:
        from diep_lightning.skipping import install_skipping_from_record
    except ImportError:
        warnings.warn("this export records adaptive expert skipping, which needs diep_lightning "
                      "(pip install diep-lightning); the model runs without skipping", stacklevel=3)
        return
    install_skipping_from_record(model, record)


class DiEPPruned{base_class}(_Base):
    """{base_class} with per-layer expert counts from `config.diep_layers`."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shrink_to_layout(self, config.diep_layers, BLOCK_ATTR, ROUTER_ATTR)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        install_recorded_skipping(loaded[0] if isinstance(loaded, tuple) else loaded, pretrained_model_name_or_path)
        return loaded
'''


def modeling_file_source(base_cls: type, block_attr: str, router_attr: str) -> str:
    """Source of the ``modeling_diep.py`` shipped in a non-uniform export."""
    return _MODELING_TEMPLATE.format(
        base_module=base_cls.__module__, base_class=base_cls.__name__, block_attr=block_attr,
        router_attr=router_attr, shrink_source=textwrap.dedent(inspect.getsource(shrink_to_layout)),
    )


def pruned_model_class(config: Any) -> type:
    """The stock ``*ForCausalLM`` class of ``config``, subclassed to shrink its layers to ``config.diep_layers``
    before weights load (the in-process twin of the export's ``modeling_diep.py``)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from diep_lightning.families import get_family

    base_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    family = get_family(config)

    class DiEPPruned(base_cls):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            shrink_to_layout(self, config.diep_layers, family.block_attr, family.router_attr)

    DiEPPruned.__name__ = DiEPPruned.__qualname__ = f"DiEPPruned{base_cls.__name__}"
    return DiEPPruned
