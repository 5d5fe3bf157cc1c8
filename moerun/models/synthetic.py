"""Synthetic checkpoints: random-weight MoE models of every supported architecture, saved to disk.

No machine moerun is tested on can download from a model hub, so tests and the benchmark build
their models here: a ``transformers`` config (tiny by default, real shapes through a preset name or
overrides), random weights, ``save_pretrained`` into a directory. ``save_pretrained`` writes the
per-expert hub key names, so the directory looks like a hub checkpoint without a tokenizer.

A checkpoint can also be generated with its routed experts already packed in a published layout
(``build_checkpoint(..., expert_format="int4-g128")``): random codes and plausible scales written
expert by expert into safetensors shards, never a float copy of the experts, so a 30 B-parameter
shape fits a small disk and a small host. The dense part is the float builder's, with the experts
left out.

This module knows nothing about offloading; it only makes checkpoints to load.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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
    # gpt-oss: 4 layers alternating sliding-window (8 tokens, so prompts exceed it) and full attention,
    # widths multiples of 32 (MXFP4 blocks), YaRN rope scaled as the published config is.
    "gpt_oss": dict(
        num_hidden_layers=4, intermediate_size=64, num_local_experts=8, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=64, rope_theta=150000.0),
    ),
}

SUPPORTED_ARCHS: tuple[str, ...] = tuple(_TINY)

# openai/gpt-oss-20b and -120b config.json but for the depth and the experts: sliding window 128 on every other
# layer, YaRN x32 over 4096, attention biases and sinks, clamped SwiGLU (limit 7); the hub publishes the
# experts in MXFP4.
_GPT_OSS: dict[str, Any] = dict(
    vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
    head_dim=64, num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
    swiglu_limit=7.0, attention_bias=True, tie_word_embeddings=False, pad_token_id=199999, eos_token_id=200002,
    rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                         original_max_position_embeddings=4096, rope_theta=150000.0),
)

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
    "gpt-oss-20b": ("gpt_oss", dict(_GPT_OSS, num_hidden_layers=24, num_local_experts=32)),
    "gpt-oss-120b": ("gpt_oss", dict(_GPT_OSS, num_hidden_layers=36, num_local_experts=128)),
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
    expert_format: str = "float",
) -> Path:
    """Save a random-weight model of ``config`` to ``path`` (safetensors, per-expert hub keys).

    ``expert_format`` other than ``"float"`` (one of :data:`PACKED_FORMATS`) writes the routed experts
    packed in that format's published layout instead (see :func:`build_packed_checkpoint`); ``dtype``
    is then the dense weights' dtype.

    The directory holds ``config.json``, ``generation_config.json`` and the safetensors file(s)
    (sharded with an index when ``max_shard_size`` is given, e.g. ``"200KB"``); no tokenizer.
    The same ``config``, ``seed`` and ``device`` always give the same weights (the random streams
    of the CPU and of a GPU differ). ``device="cuda"`` builds a real-shape model in seconds instead
    of the many minutes single-threaded CPU sampling takes; the model must fit that device.
    Returns the directory.
    """
    if expert_format != "float":
        return build_packed_checkpoint(config, path, expert_format=expert_format, seed=seed, dtype=dtype,
                                       device=device)
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


# -- routed experts packed in a published layout --------------------------------------------------------
# Expert formats (moerun.native.EXPERT_FORMATS) that checkpoints are published in: fp8-block128 as
# DeepSeek-V3 / Qwen3 *-FP8 (F8_E4M3 ``weight`` + F32 ``weight_scale_inv`` per 128x128 block), int4-gG as
# GPTQ v1 (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``, desc_act false, asymmetric), mxfp4 as gpt-oss
# (stacked experts only: ``*_blocks`` e2m1 pairs + ``*_scales`` e8m0 per 32 inputs, biases beside them).
PACKED_FORMATS: tuple[str, ...] = ("fp8-block128", "int4-g32", "int4-g64", "int4-g128", "mxfp4")
# dtypes an fp8 checkpoint's ``weight_scale_inv`` is published in (the loader widens BF16 to fp32 exactly).
FP8_SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
_PACKED_ALIASES = {"int4": "int4-g128"}
_FP8_BLOCK = 128
# Root mean square of the random codes as values (fp8: |v| in [1, 240] over 8 octaves, see
# _random_fp8_codes; int4: q - zero with q uniform in 0..15 and zero near 8): each scale is
# 1 / (rms * sqrt(fan_in)), jittered, so the weights have the float builder's std of 1/sqrt(fan_in).
_FP8_CODE_RMS = 76.6
_INT4_CODE_RMS = 4.64
# e2m1 codes uniform over the 16 nibbles: values 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6 have rms sqrt(68.5 / 8).
_E2M1_CODE_RMS = 2.93


def packed_format(name: str) -> str:
    """The canonical name of a packed checkpoint format (``"int4"`` = ``"int4-g128"``)."""
    canonical = _PACKED_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if canonical not in PACKED_FORMATS:
        raise ValueError(f"no published checkpoint layout for expert format {name!r}; packed checkpoints are "
                         f"{', '.join(PACKED_FORMATS)} (or 'int4' = int4-g128)")
    return canonical


def quantization_config(expert_format: str) -> dict[str, Any]:
    """The ``config.json`` ``quantization_config`` of a checkpoint whose experts are ``expert_format``."""
    fmt = packed_format(expert_format)
    if fmt == "fp8-block128":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [_FP8_BLOCK, _FP8_BLOCK]}
    if fmt == "mxfp4":  # as openai/gpt-oss-20b's config.json has it
        return {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return {"quant_method": "gptq", "bits": 4, "group_size": _group(fmt), "desc_act": False, "sym": False,
            "checkpoint_format": "gptq"}


def _check_fp8_scale_dtype(fmt: str, fp8_scale_dtype: torch.dtype) -> None:
    if fp8_scale_dtype not in FP8_SCALE_DTYPES:
        raise ValueError(f"fp8_scale_dtype {fp8_scale_dtype} is not one fp8 checkpoints publish; choose "
                         f"{' or '.join(map(str, FP8_SCALE_DTYPES))}")
    if fp8_scale_dtype != torch.float32 and fmt != "fp8-block128":
        raise ValueError(f"fp8_scale_dtype applies to fp8-block128 checkpoints only, not {fmt}; leave it float32")


def _group(fmt: str) -> int:
    return int(fmt.rsplit("-g", 1)[1])


@dataclass(frozen=True)
class PackedTensor:
    """One tensor of a packed linear: its key suffix (after the linear's prefix), shape and dtype."""

    suffix: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def packed_linear_tensors(expert_format: str, rows: int, cols: int,
                          fp8_scale_dtype: torch.dtype = torch.float32) -> list[PackedTensor]:
    """The tensors a ``[rows, cols]`` (out x in) linear is published as in ``expert_format`` (an fp8
    ``weight_scale_inv`` in ``fp8_scale_dtype``, one of :data:`FP8_SCALE_DTYPES`)."""
    fmt = packed_format(expert_format)
    _check_fp8_scale_dtype(fmt, fp8_scale_dtype)
    if fmt == "mxfp4":
        raise ValueError("mxfp4 is published for stacked experts (gpt-oss) only, not per expert linear")
    if fmt == "fp8-block128":
        blocks = (-(-rows // _FP8_BLOCK), -(-cols // _FP8_BLOCK))
        return [PackedTensor("weight", (rows, cols), torch.float8_e4m3fn),
                PackedTensor("weight_scale_inv", blocks, fp8_scale_dtype)]
    g = _group(fmt)
    if cols % g or rows % 8:
        raise ValueError(f"a [{rows}, {cols}] linear cannot be {fmt} (GPTQ): its inputs ({cols}) must be a "
                         f"multiple of the group ({g}) and its outputs ({rows}) of 8")
    return [PackedTensor("qweight", (cols // 8, rows), torch.int32),
            PackedTensor("qzeros", (cols // g, rows // 8), torch.int32),
            PackedTensor("scales", (cols // g, rows), torch.float16),
            PackedTensor("g_idx", (cols,), torch.int32)]


def _expert_linears(adapter) -> list[tuple[int, int]]:
    """(rows, cols) of gate, up and down of one routed expert."""
    H, I = adapter.hidden_size, adapter.expert_inter_size
    return [(I, H), (I, H), (H, I)]


def packed_expert_bytes(config: PretrainedConfig, expert_format: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one routed expert of ``config`` takes on disk packed in ``expert_format`` (biases, where the
    layout has them, in ``dtype``)."""
    from moerun.models import adapter_for

    adapter = adapter_for(config)
    if adapter.stacked_experts:
        return sum(math.prod(t.shape[1:]) * t.dtype.itemsize
                   for t in stacked_mxfp4_tensors(adapter, expert_format, dtype).values())
    return sum(t.nbytes for rows, cols in _expert_linears(adapter)
               for t in packed_linear_tensors(expert_format, rows, cols))


def stacked_mxfp4_tensors(adapter, expert_format: str, dtype: torch.dtype) -> dict[str, PackedTensor]:
    """The tensors one MoE layer of a stacked-experts (gpt-oss) architecture is published as in MXFP4, by name
    under the layer's ``experts.`` prefix: per projection ``[out, in]`` (gate_up: 2I rows, gate and up
    interleaved), ``*_blocks`` uint8 ``[E, out, in / 32, 16]`` (two e2m1 codes a byte, low nibble first),
    ``*_scales`` uint8 ``[E, out, in / 32]`` (e8m0), ``*_bias`` ``[E, out]`` in ``dtype``."""
    if packed_format(expert_format) != "mxfp4":
        raise ValueError(f"{adapter.model_type} experts are published stacked in float or mxfp4, not {expert_format}")
    E, H, I = adapter.num_experts, adapter.hidden_size, adapter.expert_inter_size
    if H % 32 or I % 32:
        raise ValueError(f"MXFP4 needs hidden ({H}) and expert width ({I}) in multiples of 32")
    tensors = {}
    for name, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
        tensors[f"{name}_blocks"] = PackedTensor(f"{name}_blocks", (E, rows, cols // 32, 16), torch.uint8)
        tensors[f"{name}_scales"] = PackedTensor(f"{name}_scales", (E, rows, cols // 32), torch.uint8)
        tensors[f"{name}_bias"] = PackedTensor(f"{name}_bias", (E, rows), dtype)
    return tensors


def _random_stacked_mxfp4(adapter, dtype: torch.dtype, generator: torch.Generator,
                          device: torch.device) -> dict[str, torch.Tensor]:
    """One MoE layer's random MXFP4 tensors (on the host), by name: uniform codes, e8m0 scales of 2^e with e
    the power of two nearest 1 / (code rms * sqrt(fan_in)) or one below (weights of std about 1/sqrt(fan_in),
    as the float builder's), biases 0.1 * N(0, 1) as the float builder's."""
    out = {}
    for name, spec in stacked_mxfp4_tensors(adapter, "mxfp4", dtype).items():
        if name.endswith("_blocks"):
            t = torch.empty(spec.shape, dtype=torch.uint8, device=device).random_(0, 256, generator=generator)
        elif name.endswith("_scales"):
            fan_in = spec.shape[-1] * 32
            e = 127 + round(math.log2(1.0 / (_E2M1_CODE_RMS * math.sqrt(fan_in))))
            t = torch.randint(e - 1, e + 1, spec.shape, generator=generator, device=device, dtype=torch.int32)
            t = t.to(torch.uint8)
        else:
            t = (0.1 * torch.randn(spec.shape, generator=generator, device=device)).to(dtype)
        out[name] = t.cpu()
    return out


def _random_fp8_codes(numel: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Random float8 e4m3 bytes: random sign and mantissa, exponent field 7..14 (|v| in [1, 240]); no NaN
    code (exponent 15), no subnormal. Four integer ops on random bytes: fast on a CPU too."""
    r = torch.empty(-(-numel // 4), dtype=torch.int32, device=device).random_(-2**31, 2**31, generator=generator)
    r = r.view(torch.uint8)[:numel]
    return ((r & 0x3F) + 0x38) | (r & 0x80)


def _jitter(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return 0.75 + 0.5 * torch.rand(shape, generator=generator, device=device)


def _random_packed_linear(fmt: str, rows: int, cols: int, generator: torch.Generator, device: torch.device,
                          fp8_scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The published tensors of one random ``[rows, cols]`` linear (on the host), by key suffix."""
    specs = {t.suffix: t for t in packed_linear_tensors(fmt, rows, cols, fp8_scale_dtype)}
    base = 1.0 / math.sqrt(cols)
    if fmt == "fp8-block128":
        codes = _random_fp8_codes(rows * cols, generator, device).view(torch.float8_e4m3fn).view(rows, cols)
        scale = base / _FP8_CODE_RMS * _jitter(specs["weight_scale_inv"].shape, generator, device)
        return {"weight": codes.cpu(), "weight_scale_inv": scale.to(fp8_scale_dtype).cpu()}
    g = _group(fmt)
    qweight = torch.empty(specs["qweight"].shape, dtype=torch.int32, device=device)
    qweight.random_(-2**31, 2**31, generator=generator)           # 8 uniform 4-bit codes per int32
    zeros = torch.randint(6, 11, (cols // g, rows), generator=generator, device=device, dtype=torch.int32)
    stored = zeros - 1                                             # GPTQ v1 stores zero - 1
    qzeros = torch.zeros(specs["qzeros"].shape, dtype=torch.int32, device=device)
    for k in range(8):                                             # output 8j + k in bits 4k..4k+3 of word j
        qzeros |= stored[:, k::8] << (4 * k)
    scales = (base / _INT4_CODE_RMS * _jitter(specs["scales"].shape, generator, device)).half()
    g_idx = torch.arange(cols, dtype=torch.int32) // g
    return {"qweight": qweight.cpu(), "qzeros": qzeros.cpu(), "scales": scales.cpu(), "g_idx": g_idx}


def _save_dense_part(config: PretrainedConfig, path: Path, *, seed: int, dtype: torch.dtype,
                     device: torch.device) -> None:
    """``save_pretrained`` of a random model of ``config`` without its routed experts (one file; transformers
    names the keys as the hub does), with ``config.json`` and ``generation_config.json``."""
    from moerun.models import adapter_for

    adapter = adapter_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in adapter.moe_layers():
        model.get_submodule(adapter.block_path(layer)).experts = torch.nn.Module()
    model.to_empty(device=device)
    _randomize_(model, torch.Generator(device=device).manual_seed(seed))
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path, max_shard_size=2**62)


def _expert_shards(adapter, per_expert_bytes: int, max_shard_bytes: int) -> list[list[tuple[int, int]]]:
    """(moe layer, expert) lists, one per shard, in layer order, each under ``max_shard_bytes`` (at least
    one expert)."""
    per_shard = max(1, max_shard_bytes // per_expert_bytes)
    experts = [(layer, e) for layer in adapter.moe_layers() for e in range(adapter.num_experts)]
    return [experts[i:i + per_shard] for i in range(0, len(experts), per_shard)]


def build_packed_checkpoint(
    config: PretrainedConfig,
    path: str | os.PathLike,
    *,
    expert_format: str,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    max_shard_bytes: int = 2**30,
    progress: Callable[[int, int], None] | None = None,
    fp8_scale_dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random-weight model of ``config`` whose routed experts are published packed in ``expert_format``.

    ``expert_format`` is one of :data:`PACKED_FORMATS`: ``"fp8-block128"`` writes each expert linear as an
    fp8 checkpoint does (``weight`` float8 e4m3 [out, in], ``weight_scale_inv`` fp32 per 128x128 block),
    ``"int4-gG"`` as GPTQ v1 does (``qweight`` int32 [in/8, out], ``qzeros`` int32 [in/G, out/8] holding
    zero - 1, ``scales`` fp16 [in/G, out], ``g_idx``); for stacked experts (gpt-oss) ``"mxfp4"`` writes each
    layer as the hub's gpt-oss checkpoints are (:func:`stacked_mxfp4_tensors`). Codes are random, scales
    plausible: the weights' std is about 1/sqrt(fan_in), as in :func:`build_checkpoint`. Dense weights are
    :func:`build_checkpoint`'s in ``dtype``; ``config.json`` carries the format's ``quantization_config``.
    ``fp8_scale_dtype=torch.bfloat16`` writes fp8 ``weight_scale_inv`` in BF16, as some fp8 checkpoints do.

    Written shard by shard (the dense part first, then experts in layer order, each shard at most
    ``max_shard_bytes``, or one stacked layer, with ``model.safetensors.index.json``), so host memory holds
    one shard. The same
    arguments give the same files on the same device kind. ``progress(done, total)`` is called per shard.
    Returns the directory.
    """
    from moerun.models import adapter_for

    fmt = packed_format(expert_format)
    _check_fp8_scale_dtype(fmt, fp8_scale_dtype)
    adapter = adapter_for(config)
    if adapter.stacked_experts:
        stacked_mxfp4_tensors(adapter, fmt, dtype)  # raises for a format this layout is not published in
        shards = [[(layer, None)] for layer in adapter.moe_layers()]  # one MoE layer a shard
    else:
        linears = _expert_linears(adapter)
        per_expert = sum(t.nbytes for rows, cols in linears
                         for t in packed_linear_tensors(fmt, rows, cols, fp8_scale_dtype))
        shards = _expert_shards(adapter, per_expert, max_shard_bytes)
    path, device = Path(path), torch.device(device)
    path.mkdir(parents=True, exist_ok=True)
    dense_dir = path / ".dense"
    _save_dense_part(config, dense_dir, seed=seed, dtype=dtype, device=device)
    total = 1 + len(shards)
    name = [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    os.replace(dense_dir / "model.safetensors", path / name[0])
    with safe_open(str(path / name[0]), framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), name[0])
    with open(path / name[0], "rb") as f:  # tensor bytes: the file less its 8-byte length and JSON header
        total_size = (path / name[0]).stat().st_size - 8 - int.from_bytes(f.read(8), "little")
    if progress:
        progress(1, total)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    for index, shard in enumerate(shards, start=1):
        tensors = {}
        for layer, expert in shard:
            if expert is None:  # a stacked layer: every expert in one tensor per name
                prefix = adapter.stacked_expert_prefix(layer)
                for tensor_name, tensor in _random_stacked_mxfp4(adapter, dtype, generator, device).items():
                    tensors[prefix + tensor_name] = tensor
                continue
            keys = adapter.expert_keys(layer, expert)
            for key, (rows, cols) in zip((keys.gate, keys.up, keys.down), linears):
                prefix = key[: -len("weight")]
                for suffix, tensor in _random_packed_linear(fmt, rows, cols, generator, device,
                                                            fp8_scale_dtype).items():
                    tensors[prefix + suffix] = tensor
        save_file(tensors, str(path / name[index]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name[index]))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        if progress:
            progress(index + 1, total)
    index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    config_json = json.loads((dense_dir / "config.json").read_text())
    config_json["quantization_config"] = quantization_config(fmt)
    (path / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    shutil.copy(dense_dir / "generation_config.json", path / "generation_config.json")
    shutil.rmtree(dense_dir)
    return path
