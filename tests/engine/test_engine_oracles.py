"""The native engine agrees decision-for-decision with textbook Python oracles (LRU, LFU, Belady,
per-layer partitions) on random traces. The oracles use the engine's step semantics: a step's
unique experts in order of first appearance, accesses counted per (token, expert) pair, a step
never evicts an expert it needs, and a miss with no evictable victim stages in a spare slot for
this step only (or runs on the CPU when no slot is spare)."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from moerun.policy.ir import CacheConfig, CompiledPolicy, PerLayerConfig
from moerun.policy_engine import PolicyEngine


class Oracle:
    def __init__(self, kind, num_layers, num_experts, caps, num_slots, per_layer):
        self.kind, self.E, self.per_layer = kind, num_experts, per_layer
        self.caps = caps                                 # capacity per partition
        self.free = list(range(num_slots - 1, -1, -1))   # popped from the end: slot 0 first
        self.slot = {}                                   # key -> slot
        self.members = [set() for _ in caps]
        self.clock = [0] * len(caps)
        self.last, self.freq, self.next = {}, {}, {}

    def step(self, layer, ids, next_uses=None):
        part = layer if self.per_layer else 0
        order, count, nxt = [], {}, {}
        for i, e in enumerate(ids):
            key = layer * self.E + e
            if key not in count:
                order.append(key)
                count[key] = 0
            count[key] += 1
            nxt[key] = next_uses[i] if next_uses is not None else math.inf
        hits, fetches, cpu, misses = [], [], [], []
        for key in order:
            self.clock[part] += count[key]
            if key in self.slot:
                hits.append((key % self.E, self.slot[key]))
            else:
                misses.append(key)
            self.last[key] = self.clock[part]
            self.freq[key] = self.freq.get(key, 0) + count[key]
            self.next[key] = nxt[key]
        needed = set(order)
        staged = []
        for key in misses:
            slot, victim = None, None
            if len(self.members[part]) < self.caps[part] and self.free:
                slot = self.free.pop()
            else:
                cands = [k for k in self.members[part] if k not in needed]
                if cands:
                    victim = min(cands, key=self.priority)
                    slot = self.slot.pop(victim)
                    self.members[part].discard(victim)
            if slot is None:
                if self.free:
                    slot = self.free.pop()
                    staged.append(slot)
                    fetches.append((key % self.E, slot, -1, -1))
                else:
                    cpu.append((key % self.E,))
                continue
            if slot not in staged:
                self.slot[key] = slot
                self.members[part].add(key)
            fetches.append((key % self.E, slot, -1 if victim is None else victim // self.E,
                            -1 if victim is None else victim % self.E))
        self.free.extend(staged)
        return hits, fetches, cpu

    def priority(self, key):
        if self.kind == "lru":
            return (self.last[key],)
        if self.kind == "lfu":
            return (self.freq[key], self.last[key])
        if self.kind == "belady":
            return (-self.next[key], self.last[key])
        raise AssertionError(self.kind)


def next_use_of(steps, num_layers, num_experts):
    """Per step and pair, the global step index of the key's next access (inf = never)."""
    seen, out = {}, [None] * len(steps)
    for g in range(len(steps) - 1, -1, -1):
        layer, ids = steps[g]
        out[g] = [seen.get(layer * num_experts + e, math.inf) for e in ids]
        for e in ids:
            seen[layer * num_experts + e] = g
    return out


def random_steps(rng, n_steps, L, E, K, max_tokens):
    steps = []
    for s in range(n_steps):
        T = int(rng.integers(1, max_tokens + 1))
        for layer in range(L):
            ids = []
            for _ in range(T):
                ids += rng.choice(E, size=K, replace=False).tolist()
            steps.append((layer, ids))
    return steps


def check_agreement(kind, seed, L, E, K, capacity, num_slots, per_layer, max_tokens):
    rng = np.random.default_rng(seed)
    steps = random_steps(rng, 12, L, E, K, max_tokens)
    if per_layer:
        policy = CompiledPolicy(name="t", cache=CacheConfig(capacity=capacity, eviction=kind),
                                per_layer=PerLayerConfig(total_budget=capacity, min_capacity=1))
        base, extra = divmod(capacity, L)
        caps = [base + (1 if l < extra else 0) for l in range(L)]
    else:
        policy = CompiledPolicy(name="t", cache=CacheConfig(capacity=capacity, eviction=kind))
        caps = [capacity]
    engine = PolicyEngine(policy, num_layers=L, num_experts=E, top_k=K, num_slots=num_slots,
                          expert_bytes=1, replay=kind == "belady")
    oracle = Oracle(kind, L, E, caps, num_slots, per_layer)
    nexts = next_use_of(steps, L, E) if kind == "belady" else [None] * len(steps)
    if kind == "belady":
        # Belady needs the future: the engine gets it through replay; compare totals per step by
        # replaying prefixes is costly, so replay the whole trace and compare the final counters.
        T = len(steps[0][1]) // K
        assert all(len(ids) == T * K for _, ids in steps)
        ids = np.array([ids for _, ids in steps], np.int32).reshape(-1, L, T, K).transpose(0, 2, 1, 3)
        ids = np.ascontiguousarray(ids.reshape(-1, L, K))
        starts = np.arange(0, ids.shape[0] + 1, T, dtype=np.int64)
        stats = engine.replay(ids, None, starts)
        hits = 0
        for (layer, step_ids), nu in zip(steps, nexts):
            h, _, _ = oracle.step(layer, step_ids, [x if x != math.inf else 2**31 - 1 for x in nu])
            hits += sum(step_ids.count(e) for e, _ in h)
        assert stats["hits"] == hits
        return
    for layer, step_ids in steps:
        plan = engine.step(layer, step_ids, [0.1] * len(step_ids))
        h, f, c = oracle.step(layer, step_ids)
        assert plan.hits == h and plan.fetches == f and plan.cpu == c, (layer, step_ids)


shapes = st.tuples(st.integers(1, 3), st.integers(4, 10), st.integers(1, 3))


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["lru", "lfu"]), seed=st.integers(0, 10**6), shape=shapes,
       cap=st.integers(1, 12), spare=st.integers(0, 3), per_layer=st.booleans(), tokens=st.integers(1, 3))
def test_lru_lfu_match_oracle_step_by_step(kind, seed, shape, cap, spare, per_layer, tokens):
    L, E, K = shape
    K = min(K, E)
    cap = max(cap, L) if per_layer else cap
    check_agreement(kind, seed, L, E, K, cap, cap + spare, per_layer, tokens)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), shape=shapes, cap=st.integers(1, 12), per_layer=st.booleans())
def test_belady_matches_oracle(seed, shape, cap, per_layer):
    L, E, K = shape
    K = min(K, E)
    cap = max(cap, L) if per_layer else cap
    check_agreement("belady", seed, L, E, K, cap, cap, per_layer, 1)


def test_belady_is_an_upper_bound_for_lru_and_lfu():
    from moerun.trace.replay import replay
    from moerun.trace.workloads import synthetic_trace

    trace = synthetic_trace("zipf", num_tokens=300, num_layers=4, num_experts=16, top_k=2, seed=3)
    rates = {k: replay(trace, CompiledPolicy(name=k, cache=CacheConfig(eviction=k)), capacity=20)["hit_rate"]
             for k in ("lru", "lfu", "belady")}
    assert rates["belady"] >= rates["lru"] and rates["belady"] >= rates["lfu"]
