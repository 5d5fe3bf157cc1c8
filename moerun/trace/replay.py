"""Offline replay: a trace through the same native policy engine the runtime uses.

The whole trace runs inside the engine (moerun._C), step by step as the runtime would call it, so
what replay reports is what the runtime would decide. Belady (the optimal offline eviction) runs
here only: the engine is given each access's next use. Learned prefetch with a predictor file
(``prefetch.predictor``) gets that predictor's output, computed for the whole trace at once by the
same code the runtime runs (:mod:`moerun.expert_predictor`); lookahead, and learned without a
predictor, get the trace's true next-layer routing (an upper bound on any predictor) unless told
otherwise.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from moerun.native import slot_layout
from moerun.policy.errors import PolicyError
from moerun.policy.ir import AUTO, CompiledPolicy, HostConfig
from moerun.policy_engine import CostModel, PolicyEngine
from moerun.trace.format import Trace

# The expert a trace without an expert size is costed as (copies, bytes fetched): the slot of a
# Qwen1.5-MoE-A2.7B expert (hidden 2048, expert intermediate 1408) in bf16.
REFERENCE_EXPERT = dict(dtype=torch.bfloat16, hidden_size=2048, inter_size=1408)


def replay(trace: Trace, policy: CompiledPolicy, *, capacity: int | None = None, num_slots: int | None = None,
           cost: CostModel | None = None, oracle_predictions: bool = True,
           host_capacity: int | None = None) -> dict:
    """Replay ``trace`` under ``policy``; returns the engine's stats plus ``estimated_ms`` (the cost
    model's time for the whole trace).

    ``capacity`` overrides the policy's cache capacity (and a per_layer total_budget that is auto);
    ``num_slots`` is the arena size (default: the capacity, i.e. no spare staging slots).
    ``host_capacity`` (or the policy's ``host { capacity }``) adds the host tier behind the GPU tier:
    its hit rate comes back under ``"host"`` (eviction and watermarks from the policy's host block).
    """
    if capacity is not None:
        policy = replace(policy, cache=replace(policy.cache, capacity=capacity))
    cap = policy.cache.capacity
    if num_slots is None:
        if cap == AUTO:
            raise PolicyError(f"policy '{policy.name}' has capacity = auto; replay needs a number of slots "
                              "(pass --capacity or --slots)")
        num_slots = cap
    expert_bytes = trace.expert_bytes or slot_layout(**REFERENCE_EXPERT).slot_bytes
    predictions = None
    if policy.prefetch.strategy == "learned" and policy.prefetch.predictor:
        from moerun.expert_predictor import load_predictor, predict_trace  # torch: only when needed

        predictor = load_predictor(policy.prefetch.predictor, num_layers=trace.num_layers,
                                   num_experts=trace.num_experts, top_k=trace.top_k,
                                   lookahead=policy.prefetch.lookahead)
        predictions = predict_trace(predictor, trace.expert_ids, trace.step_starts)
    engine = PolicyEngine(policy, num_layers=trace.num_layers, num_experts=trace.num_experts, top_k=trace.top_k,
                          num_slots=num_slots, expert_bytes=expert_bytes, cost=cost, replay=True)
    host = policy.host
    if host_capacity is not None:
        host = replace(host or HostConfig(), capacity=host_capacity)
    if host is not None and host.capacity != AUTO and host.capacity < trace.top_k:
        given = f"host capacity {host_capacity}" if host_capacity is not None else \
            f"policy '{policy.name}' has host capacity {host.capacity}, which"
        raise PolicyError(f"{given} is below the trace's top_k = {trace.top_k}: one layer step reads {trace.top_k} "
                          f"experts from the host pool at once, so it holds at least {trace.top_k} (moerun.load "
                          "refuses fewer too)")
    stats = engine.replay(trace.expert_ids, trace.gate_weights, trace.step_starts,
                          oracle_predictions=oracle_predictions, predictions=predictions, host=host,
                          prefill_steps=trace.prefill_steps)
    stats["estimated_ms"] = stats["simulated_us"] / 1e3
    stats["num_slots"] = num_slots
    stats["expert_bytes"] = expert_bytes
    return stats
