"""Launch configurations of the fused-MoE kernels, as data keyed by device and expert shape.

Tuned values live in ``fused_moe_configs.json`` beside this file, written by
``benchmarks/bench_kernels.py --tune``: ``{device_name: {"H,I": {"decode": {...}, "prefill": {...}}}}``.
A shape or device missing from the file falls back to the defaults below, which are correct
everywhere (interpreter included) and reasonable on a Hopper GPU. This module knows nothing about
the kernels themselves; it only says how to launch them.
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
class PrefillConfig:
    """Grouped-GEMM path: tokens sorted by expert into blocks of ``block_m`` pairs."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


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
            prefill=PrefillConfig(**data.get("prefill", {})),
        )


def device_key(device: torch.device) -> str:
    """The name configs are filed under: the CUDA device name, or ``"cpu"`` (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return "cpu"


def shape_key(hidden_size: int, inter_size: int) -> str:
    return f"{hidden_size},{inter_size}"


@functools.lru_cache(maxsize=1)
def _load_table() -> dict:
    if not CONFIG_FILE.exists():
        return {}
    with CONFIG_FILE.open() as f:
        return json.load(f)


def get_config(device: torch.device, hidden_size: int, inter_size: int) -> FusedMoeConfig:
    """The tuned config for this device and shape, else the defaults."""
    entry = _load_table().get(device_key(device), {}).get(shape_key(hidden_size, inter_size))
    return FusedMoeConfig.from_dict(entry) if entry else FusedMoeConfig()
