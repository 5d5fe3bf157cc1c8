"""What the bytes allow one moerun row under uniform routing: the decode tok/s bound at batch 1, and
the prefill's streaming bound (:func:`uniform_prefill_bound`: the non-resident experts a prompt needs,
``E * (1 - (1 - k/E)^T)`` per layer, moved once over the link, alone or beside the CPU executor).

Decode:

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
    # One expert for one token: the CPU's fixed cost per expert plus one token's.
    cpu_us = float(cost.get("cpu_us_per_expert") or 0.0) + float(cost.get("cpu_us_per_expert_token") or 0.0)
    cpu_gbps = slot_bytes / (cpu_us * 1e3) if cpu_us > 0 else None  # bytes per µs / 1e3 = GB/s
    measured = on_gpu and bool(handle.runtime.engine.setup.observe_timings)
    return uniform_decode_limit(moe_layers=info.num_moe_layers, experts=info.num_experts, top_k=info.top_k,
                                num_slots=int(memory["device"]["num_slots"]), slot_bytes=slot_bytes,
                                h2d_gbps=float(cost["h2d_gbps"]), cpu_gbps=cpu_gbps, dense_ms=dense_ms,
                                rates_measured=measured)


# -- prefill ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillBound:
    """The streaming bound of a prefill under uniform routing (:func:`uniform_prefill_bound`)."""

    tokens: int                    # prompt tokens of the forward, all sequences together
    experts_per_layer: float       # expected distinct experts a MoE layer needs: E * (1 - (1 - k/E)^T)
    stream_bytes: float            # of those, the non-resident ones' bytes, all MoE layers
    h2d_gbps: float
    cpu_gbps: float | None         # the CPU executor's rate over one expert's bytes at this many tokens per expert
    rates_measured: bool
    pcie_ms: float                 # stream_bytes over the link alone
    pcie_cpu_ms: float | None      # split between copies and the CPU executor in the best proportion

    @property
    def pcie_tok_s(self) -> float:
        return float("inf") if self.pcie_ms <= 0 else self.tokens / (self.pcie_ms / 1e3)

    def summary(self) -> dict:
        return dict(asdict(self), pcie_tok_s=None if math.isinf(self.pcie_tok_s) else self.pcie_tok_s)


def distinct_experts(experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts of one MoE layer when ``tokens`` tokens each pick ``top_k`` of
    ``experts`` uniformly: an expert is missed by one token with probability ``1 - k/E``, by all of
    them with ``(1 - k/E)^T``, so ``E * (1 - (1 - k/E)^T)`` (every expert once ``T`` is a few times
    ``E/k``)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def uniform_prefill_bound(*, moe_layers: int, experts: int, top_k: int, num_slots: int, slot_bytes: int,
                          tokens: int, h2d_gbps: float, cpu_us_per_expert_token: float | None = None,
                          cpu_us_per_expert: float = 0.0, rates_measured: bool = False) -> PrefillBound:
    """What the bytes allow a prefill of ``tokens`` tokens routed uniformly (the streaming bound)::

        D            = E * (1 - (1 - k/E)^T)                     distinct experts per MoE layer
        stream_bytes = layers * D * (1 - min(1, slots / (layers * E))) * slot_bytes
        pcie_ms      = stream_bytes / h2d_rate                  every non-resident expert copied once
        pcie_cpu_ms  = stream_bytes / (h2d_rate + cpu_rate)     copies and CPU experts side by side

    Each needed expert that is not resident moves its bytes once per layer (a copy, or the CPU reading
    it from host DRAM); ``cpu_rate`` is one expert's bytes over the CPU's time for its tokens,
    ``T * k / D`` of them at ``cpu_us_per_expert_token`` each after ``cpu_us_per_expert`` (the cost model's
    two CPU rates). The dense part's time is not added: the
    bound is a floor under the TTFT from the experts' bytes alone.
    """
    per_layer = distinct_experts(experts, top_k, tokens)
    resident = min(1.0, num_slots / (moe_layers * experts))
    stream_bytes = moe_layers * per_layer * (1.0 - resident) * slot_bytes
    cpu_gbps = None
    if cpu_us_per_expert_token and per_layer > 0:
        expert_us = cpu_us_per_expert + tokens * top_k / per_layer * cpu_us_per_expert_token
        cpu_gbps = slot_bytes / (expert_us * 1e3)
    pcie_ms = stream_bytes / (h2d_gbps * 1e9) * 1e3
    pcie_cpu_ms = stream_bytes / ((h2d_gbps + cpu_gbps) * 1e9) * 1e3 if cpu_gbps else None
    return PrefillBound(tokens, per_layer, stream_bytes, h2d_gbps, cpu_gbps, rates_measured, pcie_ms, pcie_cpu_ms)


def prefill_bound_of_moerun(handle, info, tokens: int, on_gpu: bool) -> PrefillBound:
    """The streaming bound of a loaded moerun model after its run, at ``tokens`` prompt tokens (rates
    from its cost model, as :func:`limit_of_moerun`)."""
    cost = handle.stats()["engine"]["cost_model"]
    memory = handle.memory()
    return uniform_prefill_bound(
        moe_layers=info.num_moe_layers, experts=info.num_experts, top_k=info.top_k,
        num_slots=int(memory["device"]["num_slots"]), slot_bytes=int(memory["experts"]["slot_bytes"]), tokens=tokens,
        h2d_gbps=float(cost["h2d_gbps"]), cpu_us_per_expert_token=float(cost.get("cpu_us_per_expert_token") or 0.0),
        cpu_us_per_expert=float(cost.get("cpu_us_per_expert") or 0.0),
        rates_measured=on_gpu and bool(handle.runtime.engine.setup.observe_timings))
