"""Prefill steps in the engine: the staging share is a bound, hybrid splits a step's misses between copies and
the CPU as the cost model says, the next layer is streamed ahead (all of it, or under hybrid the CPU's share)
once a layer routes 90 % of its experts, the decode cache comes back unless prompt accesses update it, and a
long prompt leaves decoding the hit rate a short one does (replayed traces)."""
import math
from dataclasses import replace

import numpy as np
import pytest

from moerun.native import slot_layout
from moerun.policy import compile_policy
from moerun.policy_engine import CostModel, PolicyEngine
from moerun.trace.format import Trace
from moerun.trace.replay import REFERENCE_EXPERT
from moerun.trace.workloads import synthetic_trace

L, E, K, SLOTS = 4, 16, 2, 24


def _engine(schedule: str = "mode = gpu_only", eviction: str = "lru", *, layers: int = L, experts: int = E,
            top_k: int = K, slots: int = SLOTS, expert_bytes: int = 1 << 20,
            cost: CostModel | None = None) -> PolicyEngine:
    policy = compile_policy(f"policy p {{ cache {{ eviction = {eviction} }} schedule {{ {schedule} }} }}")
    return PolicyEngine(policy, num_layers=layers, num_experts=experts, top_k=top_k, num_slots=slots,
                        expert_bytes=expert_bytes, cost=cost)


def _every_expert(tokens: int = 64, seed: int = 0) -> np.ndarray:
    """[tokens * K] ids routing every expert of a layer (a long prompt's)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(E)[:K] for _ in range(tokens)]).astype(np.int64)


class _Arena:
    """The slot table as the runtime mirrors a plan into it (fetches, prefetches, releases)."""

    def __init__(self):
        self.occupant: dict[int, tuple[int, int]] = {}

    def apply(self, layer: int, plan) -> None:
        for expert, slot, _, _ in plan.fetches:
            self.occupant[slot] = (layer, expert)
        for pl, expert, slot, _, _ in plan.prefetches:
            self.occupant[slot] = (pl, expert)
        for slot, rl, expert in plan.releases:
            if self.occupant.get(slot) == (rl, expert):
                del self.occupant[slot]


@pytest.mark.parametrize("schedule", ["mode = gpu_only prefill_staging = 0.25", "mode = hybrid prefill_staging = 0.5",
                                      "mode = gpu_only prefill_staging = 0"])
def test_staged_experts_never_exceed_the_staging_share(schedule):
    engine = _engine(schedule)
    limit = int(engine.stats()["prefill"]["staging_limit"])
    arena = _Arena()
    for chunk in range(3):                       # a chunked prompt: three prefill passes
        for layer in range(L):
            plan = engine.step(layer, _every_expert(seed=chunk * L + layer), None, prefill=True)
            # The kernel reads hits where earlier plans put them (streamed-ahead ones included).
            assert all(arena.occupant.get(slot) == (layer, expert) for expert, slot in plan.hits)
            arena.apply(layer, plan)
            # Slots holding experts the cache does not keep (staged this step or streamed ahead).
            staged = len(arena.occupant) - engine.stats()["resident"]
            assert 0 <= staged <= limit, (chunk, layer, staged, limit)
    s = engine.stats()["prefill"]
    assert s["staged_peak"] <= limit == int(SLOTS * float(schedule.rsplit("=", 1)[1]))
    if limit:
        assert s["staged"] + s["streamed"] > 0
    else:
        assert s["staged"] == 0 and engine.stats()["cpu_experts"] > 0   # no staging: the CPU takes the rest


def test_the_next_layer_is_streamed_ahead_once_a_layer_routes_nearly_every_expert():
    engine = _engine("mode = gpu_only prefill_staging = 0.75")
    plan = engine.step(0, _every_expert(), None, prefill=True)
    assert plan.stream_ahead and {pl for pl, *_ in plan.prefetches} == {1}
    streamed = {e for _, e, *_ in plan.prefetches}
    plan = engine.step(1, _every_expert(seed=1), None, prefill=True)
    assert streamed <= {e for e, _ in plan.hits}                    # streamed experts are this step's hits
    assert engine.stats()["prefill"]["streamed_used"] == len(streamed) - sum(
        engine.lookup(1, e) >= 0 for e in streamed)                  # (those the cache kept count as cached)
    few = _engine("mode = gpu_only prefill_staging = 0.75")
    plan = few.step(0, np.array([0, 1, 2, 3]), None, prefill=True)   # 4 of 16 experts: no streaming
    assert not plan.stream_ahead and plan.num_prefetches == 0
    cpu = _engine("mode = cpu_fallback")
    plan = cpu.step(0, _every_expert(), None, prefill=True)
    assert plan.num_prefetches == 0 and plan.num_fetches == 0 and plan.num_cpu == E


def _routed(tokens: dict[int, int]) -> np.ndarray:
    """The ids of a step in which expert e takes ``tokens[e]`` routed pairs."""
    return np.repeat(list(tokens), list(tokens.values())).astype(np.int64)


def _hybrid_split(tokens: dict[int, int], copy_us: float, cost: CostModel, room: int, *, copies_free_us: float = 0.0,
                  now_us: float = 0.0) -> set[int]:
    """The experts hybrid copies in a prefill step, from its definition (docs/design.md, The prefill step): the
    misses with most tokens first, each to the copy engine (behind the copies already queued until
    ``copies_free_us``) or the CPU, whichever finishes it sooner, at most ``room`` copies."""
    gpu_t, cpu_t, copied = max(now_us, copies_free_us), now_us, set()
    for e in sorted(tokens, key=lambda e: -tokens[e]):
        cpu = cost.cpu_us_per_expert + cost.cpu_us_per_expert_token * tokens[e]
        if len(copied) < room and gpu_t + copy_us <= cpu_t + cpu:
            copied.add(e)
            gpu_t += copy_us
        else:
            cpu_t += cpu
    return copied


# Copies of 1007 µs (1 MB at 1 GB/s, 7 µs latency: no sum of copies ties a sum of CPU experts) against CPU
# experts of 300 µs + 100 µs a token.
SLOW_COPY = CostModel(h2d_gbps=1.0, copy_latency_us=7.0, cpu_us_per_expert=300.0, cpu_us_per_expert_token=100.0)
SLOW_COPY_BYTES, SLOW_COPY_US = 10**6, 7.0 + 10**6 / 1e3


def test_hybrid_prefill_copies_the_misses_with_most_tokens_up_to_the_staging_room():
    engine = _engine("mode = hybrid prefill_staging = 0.25", layers=2, slots=16)
    for e in range(E):                          # the cache is full (of layer 1): layer 0's copies need staging
        assert engine.warm(1, e) >= 0
    room = int(engine.stats()["prefill"]["staging_limit"])
    tokens = {e: 3 * e + 1 for e in range(E)}  # expert 15 takes most tokens
    copy_us = CostModel().copy_latency_us + (1 << 20) / (CostModel().h2d_gbps * 1e3)
    assert len(_hybrid_split(tokens, copy_us, CostModel(), E)) > room   # the cost model alone would copy more
    plan = engine.step(0, _routed(tokens), None, prefill=True)
    copied = {e for e, *_ in plan.fetches}
    assert copied == _hybrid_split(tokens, copy_us, CostModel(), room) == set(range(E - room, E))
    assert {e for (e,) in plan.cpu} == set(range(E - room))          # the rest runs on the CPU
    assert {vl for _, _, vl, _ in plan.fetches} == {1}                 # in slots lent by the cache's victims
    assert {(rl, e) for _, rl, e in plan.releases} >= {(0, e) for e in copied}   # and gone after the step
    s = engine.stats()["prefill"]
    assert s["staged"] == s["staged_peak"] == room and engine.stats()["overflow"] == 0


def test_hybrid_prefill_splits_misses_between_copies_and_the_cpu_as_the_cost_model_says():
    engine = _engine("mode = hybrid", layers=2, slots=64, expert_bytes=SLOW_COPY_BYTES, cost=SLOW_COPY)
    tokens0 = {e: e + 1 for e in range(E)}
    plan = engine.step(0, _routed(tokens0), None, prefill=True)
    copied = {e for e, *_ in plan.fetches}
    assert copied == _hybrid_split(tokens0, SLOW_COPY_US, SLOW_COPY, room=64)
    assert 0 < len(copied) < E and {e for (e,) in plan.cpu} == set(range(E)) - copied
    cpu_us = sum(SLOW_COPY.cpu_us_per_expert + SLOW_COPY.cpu_us_per_expert_token * tokens0[e]
                 for e in range(E) if e not in copied)
    assert plan.predicted_us == pytest.approx(max(len(copied) * SLOW_COPY_US, cpu_us) + SLOW_COPY.gpu_layer_us)
    # Layer 1's misses queue behind layer 1's experts streamed ahead during layer 0's step.
    now_us, streamed = plan.predicted_us, {e for _, e, *_ in plan.prefetches}
    copies_free_us = (len(copied) + len(streamed)) * SLOW_COPY_US
    tokens1 = {e: 2 * (E - e) + e % 3 for e in range(E)}
    misses = {e: t for e, t in tokens1.items() if e not in streamed}
    expected = _hybrid_split(misses, SLOW_COPY_US, SLOW_COPY, 64, copies_free_us=copies_free_us, now_us=now_us)
    assert expected != _hybrid_split(misses, SLOW_COPY_US, SLOW_COPY, 64, now_us=now_us)   # the queue matters
    plan = engine.step(1, _routed(tokens1), None, prefill=True)
    assert {e for e, _ in plan.hits} == streamed
    assert {e for e, *_ in plan.fetches} == expected and {e for (e,) in plan.cpu} == set(misses) - expected


@pytest.mark.parametrize("per_token_us", [20.0, 100.0, 300.0])
def test_hybrid_streams_ahead_the_share_the_cpu_cannot_take(per_token_us):
    cost = CostModel(h2d_gbps=1.0, copy_latency_us=7.0, cpu_us_per_expert=300.0, cpu_us_per_expert_token=per_token_us)
    engine = _engine("mode = hybrid", layers=2, slots=64, expert_bytes=SLOW_COPY_BYTES, cost=cost)
    ids = _routed({e: 2 * e + 2 for e in range(E)})
    plan = engine.step(0, ids, None, prefill=True)
    # Copies and CPU experts finish together: n copies against E - n CPU experts of the layer's tokens per expert.
    tau = len(ids) / E
    cpu = cost.cpu_us_per_expert + per_token_us * tau
    assert plan.stream_ahead and {pl for pl, *_ in plan.prefetches} == {1}
    assert plan.num_prefetches == math.ceil(E * cpu / (cpu + SLOW_COPY_US)) < E
    gpu_only = _engine("mode = gpu_only", layers=2, slots=64, expert_bytes=SLOW_COPY_BYTES, cost=cost)
    assert gpu_only.step(0, ids, None, prefill=True).num_prefetches == E              # gpu_only streams them all


def test_streaming_ahead_starts_at_nine_tenths_of_the_experts():
    experts = 20
    assert 0.9 * experts == 18
    for routed, streams in ((18, True), (17, False)):
        engine = _engine("mode = gpu_only prefill_staging = 1", layers=2, experts=experts, slots=2 * experts)
        plan = engine.step(0, _routed({e: 2 for e in range(routed)}), None, prefill=True)
        assert plan.stream_ahead == streams, routed
        assert plan.num_prefetches == (experts if streams else 0)
        if not streams:                          # layer 1's misses are then copied on demand
            assert engine.step(1, _routed({e: 2 for e in range(routed)}), None, prefill=True).num_fetches == routed


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_a_prompt_gives_the_decode_cache_back(eviction):
    engine = _engine("mode = gpu_only prefill_staging = 0.5", eviction)
    rng = np.random.default_rng(3)
    arena = _Arena()
    for _ in range(40):                          # decode fills the cache with its working set
        for layer in range(L):
            arena.apply(layer, engine.step(layer, rng.choice(8, K, replace=False).astype(np.int64), None))
    before = {(layer, e) for layer in range(L) for e in range(E) if engine.lookup(layer, e) >= 0}
    for layer in range(L):
        arena.apply(layer, engine.step(layer, _every_expert(seed=layer), None, prefill=True))
    assert engine.stats()["prefill"]["borrowed"] > 0
    kept = sorted(e for layer, e in before if layer == 0 and engine.lookup(0, e) >= 0)[:K]
    plan = engine.step(0, np.array(kept), None)   # decoding resumes (on kept experts): lent experts come back
    arena.apply(0, plan)
    after = {(layer, e) for layer in range(L) for e in range(E) if engine.lookup(layer, e) >= 0}
    assert after == before
    assert engine.stats()["prefill"]["restored"] == engine.stats()["prefill"]["borrowed"] == plan.num_prefetches
    for _ in range(20):                          # and every later step's kernel reads its experts where they are
        for layer in range(L):
            plan = engine.step(layer, rng.choice(E, K, replace=False).astype(np.int64), None)
            assert all(arena.occupant.get(slot) == (layer, expert) for expert, slot in plan.hits)
            arena.apply(layer, plan)


@pytest.mark.parametrize("updates", [False, True])
def test_lent_slots_come_back_filled_unless_prompt_accesses_update_the_cache(updates):
    engine = _engine(f"mode = gpu_only prefill_staging = 0.5 prefill_updates_cache = {str(updates).lower()}")
    rng = np.random.default_rng(3)
    for _ in range(40):                          # decode fills every slot with its working set
        for layer in range(L):
            engine.step(layer, rng.choice(8, K, replace=False).astype(np.int64), None)
    before = {(layer, e) for layer in range(L) for e in range(E) if engine.lookup(layer, e) >= 0}
    assert len(before) == SLOTS
    lent = set()
    for layer in range(L):
        plan = engine.step(layer, _every_expert(seed=layer), None, prefill=True)
        lent |= {(vl, ve) for _, _, vl, ve in plan.fetches if vl >= 0}
        lent |= {(vl, ve) for _, _, _, vl, ve in plan.prefetches if vl >= 0}
    assert len(lent) == engine.stats()["prefill"]["borrowed"] > 0
    kept = sorted(e for layer, e in before - lent if layer == 0)[:K]
    engine.step(0, np.array(kept), None)          # decoding resumes
    after = {(layer, e) for layer in range(L) for e in range(E) if engine.lookup(layer, e) >= 0}
    if not updates:                               # the lent experts are copied back
        assert after == before and engine.stats()["prefill"]["restored"] == len(lent)
        return
    assert after == before - lent and engine.stats()["prefill"]["restored"] == 0   # their slots come back empty
    missing = sorted(e for e in range(E) if (1, e) not in after)[:len(lent)]
    plan = engine.step(1, np.array(missing), None)    # for the policy to refill: no eviction needed
    assert plan.num_fetches == len(missing) and all(vl == -1 for _, _, vl, _ in plan.fetches)


@pytest.mark.parametrize("eviction, decode, victims", [("lru", [0, 1, 2, 3], ({0}, {2})),
                                                       ("lfu", [0, 1, 2, 3, 2, 3], ({0, 1}, {2, 3}))])
def test_prompt_accesses_count_as_decodes_only_when_they_update_the_cache(eviction, decode, victims):
    """A prompt that hits experts 0 and 1: with prefill_updates_cache = true they become recent and frequent, so
    the next eviction takes another; with false the cache's order is the one decoding left."""
    for updates, expected in zip((False, True), victims):
        engine = _engine(f"mode = gpu_only prefill_updates_cache = {str(updates).lower()}", eviction,
                         layers=1, experts=8, top_k=1, slots=4)
        for e in decode:
            engine.step(0, [e], None)
        plan = engine.step(0, [0, 0, 1, 1], None, prefill=True)
        assert plan.num_hits == 2 and plan.num_fetches == plan.num_prefetches == 0
        (_, _, _, victim), = engine.step(0, [5], None).fetches
        assert victim in expected, (updates, victim)


# Decode tokens replayed before the prompt and after it: the hit rate of the first few after it shows what the
# prompt left in the cache (later on, every policy has refilled it with the decode's experts).
WARM, DECODE, CAPACITY = 64, 4, 480


def _prompt_then_decode(prompt: int, marked: bool, *, layers=24, experts=60, top_k=4, longest=2048) -> Trace:
    """Decode tokens, one prompt of ``prompt`` tokens (one step, a prefill's when ``marked``), then the same
    decode tokens whatever the prompt's length: Qwen1.5-MoE's routing shape, zipf routing."""
    src = synthetic_trace("zipf", num_tokens=WARM + longest + DECODE, num_layers=layers, num_experts=experts,
                          top_k=top_k, seed=5)
    keep = np.r_[0:WARM + prompt, WARM + longest:WARM + longest + DECODE]
    starts = np.concatenate([np.arange(WARM + 1), [WARM + prompt], WARM + prompt + np.arange(1, DECODE + 1)])
    flags = np.zeros(len(starts) - 1, np.uint8)
    flags[WARM] = 1
    return Trace(expert_ids=src.expert_ids[keep], gate_weights=src.gate_weights[keep],
                 step_starts=starts.astype(np.int64), prompt_starts=np.array([0]), num_experts=experts,
                 prefill_steps=flags if marked else None)


def _router_predictions(trace: Trace, wrong: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lookahead's predictions (ids, scores ``[steps, layers, 1, top_k]``): at each decode step and layer, the next
    layer's experts, each replaced by a random one with probability ``wrong`` (a router applied a layer early is
    right about most of them, not all; a perfect one would prefetch whatever a step needs, so what the cache
    held would not matter); none at the prompt's step, where lookahead is off."""
    rng = np.random.default_rng(seed)
    starts, ids = trace.step_starts, trace.expert_ids                  # ids [tokens, layers, top_k]
    steps, layers, top_k = len(starts) - 1, trace.num_layers, trace.top_k
    predicted = np.full((steps, layers, 1, top_k), -1, np.int32)
    for step in np.flatnonzero(np.diff(starts) == 1):
        true = ids[starts[step], 1:]                                     # [layers - 1, top_k]
        guess = rng.integers(0, trace.num_experts, size=true.shape)
        predicted[step, :-1, 0] = np.where(rng.random(true.shape) < wrong, guess, true)
    return predicted, np.ones(predicted.shape, np.float32)


def _hit_rate_after_prompt(name: str, prompt: int, marked: bool) -> float:
    """The hit rate of the decode steps after the prompt under the bundled policy ``name`` (the replay of the
    trace minus its prefix's); lookahead gets :func:`_router_predictions`, the others the trace alone."""
    policy = compile_policy(name)
    policy = replace(policy, cache=replace(policy.cache, capacity=CAPACITY))
    trace = _prompt_then_decode(prompt, marked)
    predictions = _router_predictions(trace) if policy.prefetch.strategy == "lookahead" else None

    def replayed(steps: int) -> tuple[int, int]:
        engine = PolicyEngine(policy, num_layers=trace.num_layers, num_experts=trace.num_experts, top_k=trace.top_k,
                              num_slots=CAPACITY, expert_bytes=slot_layout(**REFERENCE_EXPERT).slot_bytes,
                              replay=True)
        end = trace.step_starts[steps]
        stats = engine.replay(trace.expert_ids[:end], trace.gate_weights[:end], trace.step_starts[:steps + 1],
                              predictions=None if predictions is None else tuple(p[:steps] for p in predictions),
                              prefill_steps=None if trace.prefill_steps is None else trace.prefill_steps[:steps])
        return stats["hits"], stats["accesses"]

    (hits, accesses), (prefix_hits, prefix_accesses) = replayed(WARM + 1 + DECODE), replayed(WARM + 1)
    return (hits - prefix_hits) / (accesses - prefix_accesses)


@pytest.mark.parametrize("name", ["balanced", "lookahead", "per_layer"])
def test_decode_after_a_long_prompt_hits_as_often_as_after_a_short_one(name):
    long_, short = (_hit_rate_after_prompt(name, p, True) for p in (2048, 32))
    assert long_ >= short
    # What this guards against: the same prompt replayed as decode steps (no prefill marks) fills the cache
    # with the prompt's experts, and decoding after it hits less.
    assert _hit_rate_after_prompt(name, 2048, False) < long_ - 0.04
