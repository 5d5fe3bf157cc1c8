"""What the bytes allow: the decode tok/s bound of uniform routing at batch 1 for one moerun row.

With uniform routing every MoE layer of a token needs ``top_k`` experts, each resident with probability
``slots / (layers * experts)`` (the arena's share of the routed experts); the others are misses, served
by copying the expert over PCIe or by the CPU executor reading it from host DRAM. Nothing else about
a miss is cheaper than moving its bytes once, so with the dense part's own time per token::

    misses/token = layers * top_k * (1 - min(1, slots / (layers * experts)))
    s/token      = misses/token * slot_bytes / link_rate + dense_s
    tok/s limit  = 1 / (s/token)

``link_rate`` is the host-to-device copy rate (every miss copied: the PCIe limit) or that rate plus the
CPU executor's (misses split between copies and CPU experts running side by side, in the best
proportion: the PCIe+DRAM limit). The rates are the policy engine's cost model after the run
(measured where the policy feeds it timings, its starting numbers otherwise); the dense time is
measured with the routed experts skipped. This module measures nothing itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DecodeLimit:
    """The bound and what it was computed from."""

    misses_per_token: float        # experts a token needs that are not resident (all MoE layers)
    miss_bytes_per_token: float
    h2d_gbps: float                # host -> device copy rate
    cpu_gbps: float | None         # the CPU executor's rate over one expert's bytes (None: unknown)
    rates_measured: bool           # the cost model saw this run's timings (else its starting numbers)
    dense_ms: float                # one decode step with the routed experts skipped (0: not measured)
    pcie_tok_s: float              # every miss copied
    pcie_dram_tok_s: float | None  # misses split between copies and the CPU executor

    def summary(self) -> dict:
        """Fields for JSON; an unbounded rate (no misses, dense time not measured) is None."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def uniform_decode_limit(*, moe_layers: int, experts: int, top_k: int, num_slots: int, slot_bytes: int,
                         h2d_gbps: float, cpu_gbps: float | None = None, dense_ms: float = 0.0,
                         rates_measured: bool = False) -> DecodeLimit:
    """The batch-1 uniform-routing bound of the module docstring."""
    resident = min(1.0, num_slots / (moe_layers * experts))
    misses = moe_layers * top_k * (1.0 - resident)
    miss_bytes = misses * slot_bytes
    dense_s = dense_ms / 1e3

    def tok_s(link_gbps: float) -> float:
        seconds = miss_bytes / (link_gbps * 1e9) + dense_s
        return float("inf") if seconds <= 0 else 1.0 / seconds

    return DecodeLimit(misses, miss_bytes, h2d_gbps, cpu_gbps, rates_measured, dense_ms, tok_s(h2d_gbps),
                       tok_s(h2d_gbps + cpu_gbps) if cpu_gbps else None)


def limit_of_moerun(handle, info, dense_ms: float, on_gpu: bool) -> DecodeLimit:
    """The bound of a loaded moerun model (``model.moerun``) after its run; ``info`` the bench's
    CheckpointInfo. The rates count as measured where the policy feeds the cost model timings and
    there are device copies to time (``on_gpu``)."""
    cost = handle.stats()["engine"]["cost_model"]
    memory = handle.memory()
    slot_bytes = int(memory["experts"]["slot_bytes"])
    cpu_us = float(cost.get("cpu_us_per_expert_token") or 0.0)
    cpu_gbps = slot_bytes / (cpu_us * 1e3) if cpu_us > 0 else None  # bytes per µs / 1e3 = GB/s
    measured = on_gpu and bool(handle.runtime.engine.setup.observe_timings)
    return uniform_decode_limit(moe_layers=info.num_moe_layers, experts=info.num_experts, top_k=info.top_k,
                                num_slots=int(memory["device"]["num_slots"]), slot_bytes=slot_bytes,
                                h2d_gbps=float(cost["h2d_gbps"]), cpu_gbps=cpu_gbps, dense_ms=dense_ms,
                                rates_measured=measured)
