"""Synthetic checkpoints: random-weight MoE models of every supported architecture, saved to disk.

No machine moerun is tested on can download from a model hub, so tests and the benchmark build
their models here: a ``transformers`` config (tiny by default, real shapes through a preset name or
overrides), random weights, ``save_pretrained`` into a directory. ``save_pretrained`` writes the
per-expert hub key names, so the directory looks like a hub checkpoint without a tokenizer.

This module knows nothing about offloading; it only makes checkpoints to load.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# Tiny defaults: 2-3 layers, H = 64, E = 8, top-2, so a CPU forward takes milliseconds.
_TINY_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

_TINY: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(
        num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        head_dim=16, norm_topk_prob=True,
    ),
    "mixtral": dict(num_hidden_layers=2, intermediate_size=32, num_local_experts=8),
    "olmoe": dict(num_hidden_layers=2, intermediate_size=32, num_experts=8, norm_topk_prob=False),
    # DeepSeek: layer 0 dense (first_k_dense_replace), group-limited top-k over 2 groups of 4.
    "deepseek_v2": dict(
        num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
        num_key_value_heads=4, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        routed_scaling_factor=2.0,
    ),
    "deepseek_v3": dict(
        num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
        num_key_value_heads=4, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
}

SUPPORTED_ARCHS: tuple[str, ...] = tuple(_TINY)

# Real shapes of published models (architecture, config overrides); weights are random.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        max_position_embeddings=8192,
    )),
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    )),
    "mixtral-8x7b": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    )),
    "olmoe-1b-7b": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False,
    )),
    "deepseek-v2-lite": ("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
        q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, head_dim=64,
        topk_method="greedy", routed_scaling_factor=1.0,
    )),
}


def synthetic_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A ``transformers`` config of ``arch``: tiny by default, a preset's real shapes by name.

    ``arch`` is an architecture (one of :data:`SUPPORTED_ARCHS`, tiny shapes) or a preset name
    (one of :data:`PRESETS`, e.g. ``"qwen1.5-moe-a2.7b"``). ``overrides`` replace config fields.
    """
    if arch in PRESETS:
        model_type, fields = PRESETS[arch]
        fields = dict(fields)
    elif arch in _TINY:
        model_type, fields = arch, {**_TINY_COMMON, **_TINY[arch]}
    else:
        raise ValueError(
            f"unknown synthetic architecture {arch!r}; choose an architecture "
            f"({', '.join(SUPPORTED_ARCHS)}) or a preset ({', '.join(PRESETS)})"
        )
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def _randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter and buffer that a checkpoint stores with random values, in place.

    Linear weights get std 1/sqrt(fan_in) (activations keep unit scale, so logits are spread out
    and greedy argmax has clear margins); norms get 1 + noise; biases, including DeepSeek-V3's
    ``e_score_correction_bias``, get noise so that code ignoring them is caught.
    """
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or name.endswith("inv_freq"):
                continue
            # [E, out, in] fused experts and [out, in] linears both have fan_in last.
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32, device=tensor.device)
            if tensor.dim() == 1 and "norm" in name:
                value = 1.0 + 0.1 * noise
            elif tensor.dim() >= 2:
                value = noise / math.sqrt(tensor.shape[-1])
            else:
                value = 0.1 * noise
            tensor.copy_(value.to(tensor.dtype))


def build_checkpoint(
    config: PretrainedConfig,
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Save a random-weight model of ``config`` to ``path`` (safetensors, per-expert hub keys).

    The directory holds ``config.json``, ``generation_config.json`` and the safetensors file(s)
    (sharded with an index when ``max_shard_size`` is given, e.g. ``"200KB"``); no tokenizer.
    The same ``config``, ``seed`` and ``device`` always give the same weights (the random streams
    of the CPU and of a GPU differ). ``device="cuda"`` builds a real-shape model in seconds instead
    of the many minutes single-threaded CPU sampling takes; the model must fit that device.
    Returns the directory.
    """
    path = Path(path)
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _randomize_(model, generator)
    model.generation_config.pad_token_id = config.pad_token_id
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path
