"""Memory plan: how a device-memory budget splits into skeleton, KV cache, workspace and arena.

Computed from checkpoint headers and the config alone, before anything large is allocated, so a
budget that is too small fails at once with the smallest budget that works.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..models.base import MoeAdapter
from .generate_hooks import MAX_STEP_TOKENS

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Device memory kept free besides the plan when the budget is "auto" (allocator slack, library
# workspaces such as cuBLAS's): the larger of this and 5% of free memory.
AUTO_MARGIN_BYTES = 1 << 30
# Fixed part of the workspace: the fused-MoE scratch and small per-step buffers, and what
# torch.compile allocates while it compiles the fast path with a cold cache (H100, Qwen1.5-MoE
# shapes: the load's peak 16.7 MiB above the steady one; at 64 MiB a cold load went 2.7 MiB over a
# 10 GiB budget, at 96 MiB it stays 29 MiB under: benchmarks/RESULTS.md).
WORKSPACE_BASE_BYTES = 96 << 20


class BudgetError(ValueError):
    """A memory budget is malformed or too small for the model."""


def parse_bytes(value: int | str, what: str = "budget", other: str = "") -> int:
    """``10GiB``, ``"512 MB"``, ``"1.5gb"`` or an int of bytes -> bytes; a size that is not a whole
    number of bytes (``"1.9B"``, ``1.5``) is refused, not rounded. ``other``: what else the caller takes
    (e.g. "or 'auto' (...)"), named when ``value`` cannot be read."""
    if isinstance(value, bool):
        raise BudgetError(f"{what} must be bytes or a size string like '10GiB', not {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if value <= 0:
            raise BudgetError(f"{what} must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise BudgetError(
            f"cannot read {what} {value!r}: use bytes (int) or a number with a unit "
            f"(B, KB, MB, GB, KiB, MiB, GiB), e.g. '10GiB'{', ' + other if other else ''}"
        )
    size = Fraction(match.group(1)) * _UNITS[match.group(2).lower()]  # exact: no float rounding
    if size <= 0:
        raise BudgetError(f"{what} must be positive, got {value!r}")
    if size.denominator != 1:
        raise BudgetError(f"{what} {value!r} is {float(size):g} bytes, not a whole number of bytes; round it "
                          "to whole bytes, or to a whole number of a smaller unit (e.g. '1536MiB')")
    if size >= 1 << 63:
        raise BudgetError(f"{what} {str(value)[:40]}... is larger than any machine's memory")
    return int(size)


def slot_layout(adapter: MoeAdapter, dtype: torch.dtype, expert_format: str = "float"):
    """The layout of one of the model's expert slots in ``dtype`` and ``expert_format`` (with the experts'
    biases where the architecture has them): the native definition (csrc/slot_layout.h), which the arena,
    the host pool and the kernels use too."""
    from ..native import slot_layout as native_slot_layout

    return native_slot_layout(dtype, adapter.hidden_size, adapter.expert_inter_size, expert_format,
                              bias=adapter.expert_activation.bias)


def slot_elems(adapter: MoeAdapter) -> int:
    """Elements of one float-format expert slot, padding included (without biases the same for every float
    dtype; biases are 16-byte aligned, so in elements their padding depends on the dtype: fp32 here)."""
    return slot_layout(adapter, torch.float32).slot_elems


@dataclass(frozen=True)
class MemoryPlan:
    """Device bytes of each part; ``num_slots`` expert slots fill what the budget leaves."""

    budget_bytes: int
    skeleton_bytes: int      # non-expert weights (embeddings, attention, norms, routers, shared experts)
    kv_cache_bytes: int      # KV cache of max_batch sequences of max_context tokens
    workspace_bytes: int     # activations of a prefill_chunk-token forward + fixed scratch
                             # + the fast decode path's step buffers and graph pool
    slot_bytes: int          # one expert slot
    num_slots: int
    min_slots: int           # slots a step of one token needs (top_k)
    slot_elems: int          # elements of the model dtype in one slot (the arena's row length)
    expert_format: str = "float"  # the experts' format in the host pool and the arena (EXPERT_FORMATS)
    prefill_chunk: int = 0   # tokens (all sequences together) of the largest forward whose activations the
                             # workspace holds; a longer prefill runs in chunks of this many (generate_hooks)

    @property
    def arena_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def fixed_bytes(self) -> int:
        return self.skeleton_bytes + self.kv_cache_bytes + self.workspace_bytes

    @property
    def min_budget_bytes(self) -> int:
        """The smallest budget that works: everything but the arena plus ``min_slots`` slots."""
        return self.fixed_bytes + self.min_slots * self.slot_bytes


def _activation_bytes_per_token(adapter: MoeAdapter, itemsize: int) -> int:
    """A few hidden-size tensors (residual, norm output, attention output, MoE output), the widest
    MLP intermediate three times (gate, up, product), the routed pairs' fp32 scratch, and the
    router's fp32 scores."""
    cfg = adapter.config
    widest = max(getattr(cfg, "intermediate_size", 0) or 0,
                 getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
                 adapter.top_k * adapter.expert_inter_size)
    return itemsize * (8 * adapter.hidden_size + 3 * widest) + 4 * (
        adapter.top_k * adapter.expert_inter_size + 2 * adapter.num_experts
    )


def workspace_bytes(adapter: MoeAdapter, itemsize: int, tokens: int) -> int:
    """Peak activation memory of a forward over ``tokens`` tokens, plus fixed scratch."""
    per_token = _activation_bytes_per_token(adapter, itemsize)
    return WORKSPACE_BASE_BYTES + tokens * per_token + 4 * adapter.config.vocab_size * max(1, tokens // 1024)


def decode_graph_bytes(adapter: MoeAdapter, itemsize: int, max_batch: int, max_context: int) -> int:
    """What the fast decode path keeps besides the KV cache, for its largest step (max_batch x
    MAX_STEP_TOKENS tokens): the step's static buffers and its graphs' private memory pool (both about
    the step's activations and logits), the fp32 attention scores and the mask over max_context."""
    cfg = adapter.config
    tokens = max_batch * MAX_STEP_TOKENS
    activations = tokens * (_activation_bytes_per_token(adapter, itemsize) + itemsize * cfg.vocab_size)
    attention = tokens * max_context * (2 * 4 * cfg.num_attention_heads + 4)
    return 2 * activations + attention


def check_prefill_chunk(prefill_chunk: int | None, *, max_context: int, max_batch: int) -> int:
    """``prefill_chunk`` as load() takes it -> tokens of the largest prefill forward.

    None (auto): ``max_batch * max_context``, a whole prompt of every sequence the KV cache holds, so
    no prompt is chunked. An int reserves activations for that many tokens instead (the workspace
    shrinks, the arena gets the difference) and prompts of more tokens are prefilled in chunks. It
    must cover one token of each of ``max_batch`` sequences (a chunk splits the sequence axis) and
    no more than the KV cache holds.
    """
    most = max_batch * max_context
    if prefill_chunk is None:
        return most
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int):
        raise ValueError(f"prefill_chunk must be None (auto) or an int of tokens, not {prefill_chunk!r}")
    if not max_batch <= prefill_chunk <= most:
        raise ValueError(
            f"prefill_chunk must be in {max_batch}..{most} tokens (max_batch .. max_batch x max_context: at least "
            f"one token of each sequence, at most the whole KV cache), got {prefill_chunk}")
    return prefill_chunk


def plan_memory(
    adapter: MoeAdapter,
    *,
    skeleton_bytes: int,
    dtype: torch.dtype,
    budget_bytes: int,
    max_context: int,
    max_batch: int,
    max_slots: int,
    expert_format: str = "float",
    prefill_chunk: int | None = None,
) -> MemoryPlan:
    """Split ``budget_bytes``; raise :class:`BudgetError` with the smallest budget if too small.

    ``max_slots`` caps the arena (no point in more slots than routed experts). The workspace holds
    the activations of a forward over ``prefill_chunk`` tokens (:func:`check_prefill_chunk`; auto:
    ``max_batch x max_context``); the plan's ``prefill_chunk`` is that token count.
    """
    itemsize = torch.tensor([], dtype=dtype).element_size()
    tokens = max_batch * max_context
    chunk = check_prefill_chunk(prefill_chunk, max_context=max_context, max_batch=max_batch)
    kv = adapter.num_layers * adapter.kv_elems_per_token() * itemsize * tokens
    # The prefill's activations and the fast decode path's buffers and graph pool are both kept.
    work = workspace_bytes(adapter, itemsize, chunk) + decode_graph_bytes(adapter, itemsize, max_batch, max_context)
    layout = slot_layout(adapter, dtype, expert_format)
    slot = layout.slot_bytes
    min_slots = min(adapter.top_k, max_slots)
    fixed = skeleton_bytes + kv + work
    num_slots = min(max_slots, max(0, (budget_bytes - fixed) // slot))
    plan = MemoryPlan(budget_bytes, skeleton_bytes, kv, work, slot, num_slots, min_slots, layout.slot_elems,
                      expert_format, chunk)
    if num_slots < min_slots:
        raise BudgetError(
            f"vram_budget {fmt_bytes(budget_bytes)} is too small: the model needs "
            f"{fmt_bytes(skeleton_bytes)} of non-expert weights + {fmt_bytes(kv)} of KV cache "
            f"({max_batch} x {max_context} tokens) + {fmt_bytes(work)} of workspace + "
            f"{min_slots} expert slots of {fmt_bytes(slot)} ({expert_format}); the smallest budget that works is "
            f"{fmt_bytes(plan.min_budget_bytes)} ({plan.min_budget_bytes} bytes). Raise vram_budget, "
            "or lower max_context / max_batch."
        )
    return plan


def fmt_bytes(n: int) -> str:
    """Human-readable bytes with binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"
