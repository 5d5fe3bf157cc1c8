"""Prefill steps in the engine: the staging share is a bound, the next layer is streamed ahead, the decode
cache comes back, and a long prompt leaves decoding the hit rate a short one does (replayed traces)."""
import numpy as np
import pytest

from moerun.policy import compile_policy
from moerun.policy_engine import PolicyEngine
from moerun.trace.format import Trace
from moerun.trace.replay import replay
from moerun.trace.workloads import synthetic_trace

L, E, K, SLOTS = 4, 16, 2, 24


def _engine(schedule: str = "mode = gpu_only", eviction: str = "lru") -> PolicyEngine:
    policy = compile_policy(f"policy p {{ cache {{ eviction = {eviction} }} schedule {{ {schedule} }} }}")
    return PolicyEngine(policy, num_layers=L, num_experts=E, top_k=K, num_slots=SLOTS, expert_bytes=1 << 20)


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


def _prompt_then_decode(prompt: int, marked: bool, *, layers=24, experts=60, top_k=4, warm=64, decode=64,
                        longest=2048) -> Trace:
    """Decode tokens, one prompt of ``prompt`` tokens (one step, a prefill's when ``marked``), then the same
    decode tokens whatever the prompt's length: Qwen1.5-MoE's routing shape, zipf routing."""
    src = synthetic_trace("zipf", num_tokens=warm + longest + decode, num_layers=layers, num_experts=experts,
                          top_k=top_k, seed=5)
    keep = np.r_[0:warm + prompt, warm + longest:warm + longest + decode]
    starts = np.concatenate([np.arange(warm + 1), [warm + prompt], warm + prompt + np.arange(1, decode + 1)])
    flags = np.zeros(len(starts) - 1, np.uint8)
    flags[warm] = 1
    return Trace(expert_ids=src.expert_ids[keep], gate_weights=src.gate_weights[keep],
                 step_starts=starts.astype(np.int64), prompt_starts=np.array([0]), num_experts=experts,
                 prefill_steps=flags if marked else None)


def _hit_rate_after_prompt(policy, prompt: int, marked: bool, capacity: int) -> float:
    """The hit rate of the decode steps after the prompt (the replay of the trace minus its prefix's)."""
    trace = _prompt_then_decode(prompt, marked)
    upto = trace.step_starts[65]                 # warm-up decode and the prompt
    prefix = Trace(expert_ids=trace.expert_ids[:upto], gate_weights=trace.gate_weights[:upto],
                   step_starts=trace.step_starts[:66], prompt_starts=np.array([0]), num_experts=trace.num_experts,
                   prefill_steps=None if trace.prefill_steps is None else trace.prefill_steps[:65])
    whole, start = replay(trace, policy, capacity=capacity), replay(prefix, policy, capacity=capacity)
    return (whole["hits"] - start["hits"]) / (whole["accesses"] - start["accesses"])


@pytest.mark.parametrize("name", ["balanced", "lookahead", "per_layer"])
def test_decode_after_a_long_prompt_hits_as_often_as_after_a_short_one(name):
    policy = compile_policy(name)
    long_, short = (_hit_rate_after_prompt(policy, p, True, 480) for p in (2048, 32))
    assert long_ >= short


def test_a_prompt_replayed_as_decode_steps_trashes_the_cache():
    """What the test above guards against: the same prompt run as decode steps (no prefill marks)."""
    policy = compile_policy("per_layer")
    assert _hit_rate_after_prompt(policy, 2048, False, 480) < _hit_rate_after_prompt(policy, 32, False, 480) - 0.05
