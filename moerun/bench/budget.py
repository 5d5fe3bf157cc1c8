"""VRAM budgets as the user writes them: absolute sizes ("10GiB", "512MB") or shares of the model ("50%").

This module knows nothing about models or devices: it turns text into a :class:`Budget` and a
budget plus a model size into bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Decimal and binary units, lower-cased; a bare number is bytes.
_UNIT_BYTES = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_SHARE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class Budget:
    """A VRAM budget: either ``size_bytes`` or ``model_share`` (fraction of the model's bytes) is set."""

    text: str                        # as written, for tables and file names
    size_bytes: int | None = None
    model_share: float | None = None

    def resolve(self, model_bytes: int) -> int:
        """The budget in bytes for a model of ``model_bytes`` bytes."""
        if self.size_bytes is not None:
            return self.size_bytes
        return int(self.model_share * model_bytes)


def parse_size_bytes(text: str) -> int:
    """``"10GiB"`` -> 10737418240. Units: B, kB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB or K/M/G/T (powers of 2)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNIT_BYTES:
        raise ValueError(
            f"cannot read {text!r} as a size: write a number and a unit, e.g. '10GiB', '512MiB', '24GB'"
        )
    return int(float(match.group(1)) * _UNIT_BYTES[unit])


def parse_budget(text: str) -> Budget:
    """Parse ``"10GiB"`` (an absolute size) or ``"50%"`` (a share of the model's bytes)."""
    share = _SHARE.match(str(text))
    if share is not None:
        fraction = float(share.group(1)) / 100.0
        if not 0.0 < fraction:
            raise ValueError(f"budget {text!r} must be a positive share of the model, e.g. '50%'")
        return Budget(text=str(text).strip(), model_share=fraction)
    size_bytes = parse_size_bytes(text)
    if size_bytes <= 0:
        raise ValueError(f"budget {text!r} must be positive, e.g. '10GiB'")
    return Budget(text=str(text).strip(), size_bytes=size_bytes)


def format_bytes(num_bytes: float | None) -> str:
    """``10737418240`` -> ``"10.00 GiB"``; None -> ``"n/a"``."""
    if num_bytes is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"
