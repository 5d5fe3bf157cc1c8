"""Policy-engine benchmarks (host CPU only; no GPU involved).

1. Decision cost per layer step through the call path the runtime uses
   (``PolicyEngine.step(layer, ids, weights)`` with Python lists, and with numpy arrays), one token,
   64 experts, top-8, 24 layers, for LRU, LFU and a composed policy (LFU+decay, history prefetch,
   hybrid schedule, an adapt rule).
2. Replay throughput (expert accesses per second) for LRU and LFU.
3. Per-layer structure vs allocation signal: flat LRU vs per-layer partitions with uniform and
   entropy-proportional allocation, on Zipf traces whose layers differ in skew.

Usage: python benchmarks/bench_engine.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from moerun.policy.ir import (AdaptRule, CacheConfig, CompiledPolicy, PerLayerConfig, PrefetchConfig,
                                  ScheduleConfig)
from moerun.policy_engine import PolicyEngine
from moerun.trace.replay import replay
from moerun.trace.workloads import synthetic_trace

L, E, K = 24, 64, 8
POLICIES = {
    "lru": CompiledPolicy(name="lru", cache=CacheConfig(capacity=512, eviction="lru")),
    "lfu": CompiledPolicy(name="lfu", cache=CacheConfig(capacity=512, eviction="lfu")),
    "composed": CompiledPolicy(
        name="composed", cache=CacheConfig(capacity=512, eviction="lfu", frequency_decay=0.95),
        prefetch=PrefetchConfig(strategy="history", budget=4), schedule=ScheduleConfig(mode="hybrid"),
        adapt=(AdaptRule(metric="hit_rate", op="<", threshold=0.2, window=200,
                         assignments=(("prefetch.budget", 2),)),)),
}


def decision_cost_us(policy: CompiledPolicy, steps: int, as_numpy: bool) -> float:
    trace = synthetic_trace("zipf", num_tokens=steps // L + 1, num_layers=L, num_experts=E, top_k=K, seed=0)
    engine = PolicyEngine(policy, num_layers=L, num_experts=E, top_k=K, num_slots=512, expert_bytes=17_301_504)
    calls = []
    for t in range(trace.num_tokens):
        for layer in range(L):
            ids, w = trace.expert_ids[t, layer], trace.gate_weights[t, layer]
            calls.append((layer, ids.copy(), w.copy()) if as_numpy else (layer, ids.tolist(), w.tolist()))
    calls = calls[:steps]
    step = engine.step
    for layer, ids, w in calls[: steps // 4]:  # warm up: buffers grown, cache filled
        step(layer, ids, w)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for layer, ids, w in calls:
            step(layer, ids, w)
        best = min(best, (time.perf_counter() - t0) / len(calls) * 1e6)
    return best


def replay_rate(policy: CompiledPolicy) -> float:
    trace = synthetic_trace("zipf", num_tokens=4096, num_layers=L, num_experts=E, top_k=K, seed=1)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        replay(trace, policy, capacity=512)
        best = max(best, trace.num_accesses / (time.perf_counter() - t0))
    return best


def structure_vs_allocation() -> list[dict]:
    rows = []
    for seed in (0, 1, 2):
        trace = synthetic_trace("zipf", num_tokens=2048, num_layers=L, num_experts=E, top_k=K, seed=seed,
                                zipf_min=0.3, zipf_max=1.6)
        for per_expert_layer in (4, 8, 16, 24):
            cap = per_expert_layer * L
            row = dict(seed=seed, capacity=cap)
            row["flat_lru"] = replay(trace, CompiledPolicy(name="flat"), capacity=cap)["hit_rate"]
            for alloc in ("uniform", "entropy"):
                pl = PerLayerConfig(allocation=alloc, total_budget=cap, min_capacity=1, rebalance_interval=2000,
                                    entropy_window=4000)
                row[f"per_layer_{alloc}"] = replay(trace, CompiledPolicy(name=alloc, per_layer=pl),
                                                   capacity=cap)["hit_rate"]
            row["belady"] = replay(trace, CompiledPolicy(name="b", cache=CacheConfig(eviction="belady")),
                                   capacity=cap)["hit_rate"]
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = dict(device=f"{platform.processor() or platform.machine()} (host CPU)", date=time.strftime("%Y-%m-%d"))
    out["decision_us_per_layer"] = {
        f"{name}/{'numpy' if np_ else 'list'}": decision_cost_us(p, 20_000, np_)
        for name, p in POLICIES.items() for np_ in (False, True)
    }
    out["replay_accesses_per_s"] = {name: replay_rate(POLICIES[name]) for name in ("lru", "lfu")}
    out["structure_vs_allocation"] = structure_vs_allocation()
    for k, v in out["decision_us_per_layer"].items():
        print(f"decision {k:<16} {v:6.2f} us/layer")
    for k, v in out["replay_accesses_per_s"].items():
        print(f"replay   {k:<16} {v / 1e6:6.2f} M accesses/s")
    print(f"{'seed':>4} {'cap':>5} {'flat_lru':>9} {'pl_uniform':>10} {'pl_entropy':>10} {'belady':>7}")
    for r in out["structure_vs_allocation"]:
        print(f"{r['seed']:>4} {r['capacity']:>5} {r['flat_lru']:>9.4f} {r['per_layer_uniform']:>10.4f} "
              f"{r['per_layer_entropy']:>10.4f} {r['belady']:>7.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
