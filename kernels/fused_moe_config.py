"""Launch configurations of the fused-MoE kernels, as data keyed by device and expert shape.

Tuned values live in ``fused_moe_configs.json`` beside this file, written by
``benchmarks/bench_kernels.py --tune``: ``{device_name: {"H,I": {"decode": {...}, "prefill": {...}}}}``
for the float format and ``"H,I,format"`` (``"2048,1408,int4-g128"``) for the quantized expert
formats. A float shape or device missing from the file falls back to the dataclass defaults below;
a quantized format's to the file's ``"defaults"`` entry for that format (its tiles differ: bytes
read 16 at a time, no TMA, a prefill reduction step within one scale group). Both are correct everywhere
(interpreter included) and reasonable on a Hopper GPU. This module knows nothing about the kernels
themselves; it only says how to launch them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

CONFIG_FILE = Path(__file__).with_name("fused_moe_configs.json")

# Above this many tokens the grouped-GEMM (prefill) path runs; at or below, the weight-streaming one.
DECODE_MAX_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Weight-streaming path: one program per (token, expert) pair and block of intermediate rows."""

    block_n: int = 8  # gate_up: intermediate rows per program
    block_h: int = 512  # gate_up: hidden columns per load
    block_out: int = 4  # down: output (hidden) rows per program
    block_i: int = 512  # down: intermediate columns per load
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """One grouped GEMM's tile: output columns and reduction depth per step, warps, pipeline stages."""

    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    # Weight tiles by TMA (Hopper and later), where the device and the slot layout allow it (slot
    # elements divisible by H and I, rows 16-byte aligned); else pointer loads. For gate_up the
    # choice is also one of shape: TMA loads gate and up tiles apart (two dots), pointer loads one
    # tile with their rows interleaved (one dot of 2 * block_n columns).
    tma: bool = False
    # launch order: 0 = blocks fastest (each weight tile read by an expert's blocks together);
    # g = groups of g blocks, all of a group's tiles before the next (each block's rows reused)
    group_m: int = 0


def short_block_sizes(block_m: int, tail_m: int) -> int:
    """How many block sizes below block_m an expert's rest is split into (block_m/2 .. tail_m); the
    prefill GEMMs have a code path for each, so tail_m is block_m, block_m / 2 or block_m / 4."""
    for n in range(3):
        if tail_m >= 1 and tail_m == block_m >> n:
            return n
    raise ValueError(f"tail_m ({tail_m}) must be block_m ({block_m}), block_m / 2 or block_m / 4")


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Grouped-GEMM path: pairs sorted by expert into blocks of ``block_m`` pairs of one expert.

    An expert's pairs beyond its full blocks are rounded up to ``tail_m`` rows (``block_m``, or half
    or a quarter of it) and computed in blocks of ``block_m / 2`` and ``block_m / 4`` rows, so an
    expert's last block is less padding. The two GEMMs share the blocks but not their tiles:
    down reduces over I, often half of gate_up's reduction over H, and writes one row per pair.
    """

    block_m: int = 128
    tail_m: int = 64
    gate_up: GemmTile = GemmTile()
    down: GemmTile = GemmTile(group_m=8)
    sum_block_h: int = 1024  # the last kernel's hidden columns per program

    def __post_init__(self):
        short_block_sizes(self.block_m, self.tail_m)  # raises on a tail the kernels have no path for

    @staticmethod
    def from_dict(data: dict) -> "PrefillConfig":
        data = dict(data)
        tiles = {k: GemmTile(**data.pop(k)) for k in ("gate_up", "down") if k in data}
        return PrefillConfig(**data, **tiles)


@dataclasses.dataclass(frozen=True)
class FusedMoeConfig:
    """Both paths' launch parameters for one (device, H, I)."""

    decode: DecodeConfig = DecodeConfig()
    prefill: PrefillConfig = PrefillConfig()

    def to_dict(self) -> dict:
        return {"decode": dataclasses.asdict(self.decode), "prefill": dataclasses.asdict(self.prefill)}

    @staticmethod
    def from_dict(data: dict) -> "FusedMoeConfig":
        return FusedMoeConfig(
            decode=DecodeConfig(**data.get("decode", {})),
            prefill=PrefillConfig.from_dict(data.get("prefill", {})),
        )


def device_key(device: torch.device) -> str:
    """The name configs are filed under: the CUDA device name, or ``"cpu"`` (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"


def shape_key(hidden_size: int, inter_size: int, format: str = "float") -> str:
    """The key of a tuned entry: ``"H,I"`` for the float format, ``"H,I,format"`` for the others."""
    return f"{hidden_size},{inter_size}" if format == "float" else f"{hidden_size},{inter_size},{format}"


# the file's entry of per-format defaults ({format: config}); not a device name
DEFAULTS_KEY = "defaults"


@functools.lru_cache(maxsize=1)
def _load_table() -> dict:
    if not CONFIG_FILE.exists():
        return {}
    with CONFIG_FILE.open() as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)  # called per MoE layer call: parse each entry once
def get_config(device: torch.device, hidden_size: int, inter_size: int,
               dtype: torch.dtype = torch.bfloat16, format: str = "float") -> FusedMoeConfig:
    """The tuned config for this device, shape and expert format, else the format's defaults.

    Configs are tuned in bf16 and serve fp16 too. fp32 gets the defaults: a tuned tile's pipeline
    stages (or TMA buffers) in shared memory take twice the bytes at fp32 and may not fit.
    Raises ValueError for a quantized format the file has no defaults for.
    """
    if format == "float":
        default = FusedMoeConfig()
    else:
        defaults = _load_table().get(DEFAULTS_KEY, {})
        if format not in defaults:
            raise ValueError(f"no fused-MoE launch config for expert format {format!r}: add its defaults to "
                             f"{CONFIG_FILE.name} (formats with defaults: {', '.join(defaults) or 'none'})")
        default = FusedMoeConfig.from_dict(defaults[format])
    if dtype == torch.float32:
        return default
    entry = _load_table().get(device_key(device), {}).get(shape_key(hidden_size, inter_size, format))
    return FusedMoeConfig.from_dict(entry) if entry else default
