"""MoE family adapters: the only code that knows how each transformers MoE family is built.

Use :func:`get_family` on a model or config, then :meth:`MoEFamily.blocks` to reach its sparse blocks.
"""

from diep_lightning.families import (  # noqa: F401  (importing registers each adapter)
    deepseek_v2,
    deepseek_v3,
    gpt_oss,
    granitemoe,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
)
from diep_lightning.families.base import MoEBlock, MoEFamily
from diep_lightning.families.registry import get_family, register_family, supported_model_types

__all__ = ["MoEBlock", "MoEFamily", "get_family", "register_family", "supported_model_types"]
