"""VRAM budgets as the bench's user writes them, resolved to bytes for one checkpoint.

Three forms: an absolute size (``"10GiB"``, parsed by moerun's own ``parse_bytes``), a share of
the whole model (``"50%"``), or a share of the routed experts on top of what everything else needs
(``"experts:50%"``: the dense weights, KV cache and workspace of moerun's memory plan, plus room
for half of the routed experts). The last form means the same on any model and any device, which
makes it the CPU default. This module knows nothing about the systems that use a budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from moerun.runtime.memory import fmt_bytes, parse_bytes

_SHARE = re.compile(r"^\s*(experts\s*:\s*)?([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class Budget:
    """A VRAM budget: exactly one of ``size_bytes``, ``model_share``, ``experts_share`` is set."""

    text: str                        # as written, for tables and file names
    size_bytes: int | None = None
    model_share: float | None = None
    experts_share: float | None = None

    def resolve(self, *, model_bytes: int, fixed_bytes: int, routed_bytes: int) -> int:
        """Bytes for a model of ``model_bytes`` whose plan needs ``fixed_bytes`` besides the
        experts and whose routed experts take ``routed_bytes`` in slots."""
        if self.size_bytes is not None:
            return self.size_bytes
        if self.model_share is not None:
            return int(self.model_share * model_bytes)
        return fixed_bytes + int(self.experts_share * routed_bytes)


def parse_budget(text: str) -> Budget:
    """``"10GiB"``, ``"50%"`` (of the model) or ``"experts:50%"`` (of the routed experts)."""
    share = _SHARE.match(str(text))
    if share is None:
        return Budget(text=str(text).strip(), size_bytes=parse_bytes(str(text).strip(), "budget"))
    fraction = float(share.group(2)) / 100.0
    if fraction <= 0:
        raise ValueError(f"budget {text!r} must be a positive share, e.g. '50%' or 'experts:50%'")
    if share.group(1):
        return Budget(text=str(text).strip(), experts_share=fraction)
    return Budget(text=str(text).strip(), model_share=fraction)


def format_bytes(num_bytes: int | None) -> str:
    """Binary units (``"10.00 GiB"``); ``"n/a"`` for None."""
    return "n/a" if num_bytes is None else fmt_bytes(int(num_bytes))
