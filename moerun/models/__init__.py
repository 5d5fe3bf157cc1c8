"""Architecture adapters: one small module per supported MoE model type.

``adapter_for(config)`` picks the adapter of a ``transformers`` config; ``synthetic`` builds
random-weight checkpoints of the same architectures for tests and benchmarks.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from .base import ExpertKeys, MoeAdapter
from .deepseek_v2 import DeepseekV2Adapter
from .deepseek_v3 import DeepseekV3Adapter
from .gpt_oss import GptOssAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, type[MoeAdapter]] = {
    cls.model_type: cls
    for cls in (
        Qwen2MoeAdapter, Qwen3MoeAdapter, MixtralAdapter, OlmoeAdapter,
        DeepseekV2Adapter, DeepseekV3Adapter, GptOssAdapter,
    )
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(ADAPTERS)


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's ``model_type`` has no moerun adapter."""


def adapter_for(config: PretrainedConfig) -> MoeAdapter:
    """The adapter of ``config.model_type``; an error listing the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"moerun does not support model_type {model_type!r}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return ADAPTERS[model_type](config)


__all__ = ["ADAPTERS", "ExpertKeys", "MoeAdapter", "SUPPORTED_ARCHITECTURES",
           "UnsupportedArchitectureError", "adapter_for"]
