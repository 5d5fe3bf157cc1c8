"""The routing metrics an adapt rule may name (drift, utilization_gini, cost_per_token) and the cache's
capacity_factor, as MoE-PolicyLang defines them, computed by the native engine."""
from __future__ import annotations

import math

import pytest

from moerun.policy import compile_policy
from moerun.policy.errors import PolicyError
from moerun.policy.ir import CacheConfig, CompiledPolicy
from moerun.policy_engine import PolicyEngine


def make(policy=None, *, L=1, E=4, K=1, slots=4, replay=False):
    policy = policy or CompiledPolicy(name="t", cache=CacheConfig(capacity=slots))
    return PolicyEngine(policy, num_layers=L, num_experts=E, top_k=K, num_slots=slots, expert_bytes=1000,
                        replay=replay)


def test_utilization_gini_is_zero_for_even_use_and_near_one_when_one_expert_takes_all():
    engine = make()
    engine.keep_access_log(8)
    engine.step(0, [0, 1, 2, 3, 0, 1, 2, 3], None)
    assert engine.metric("utilization_gini", 8) == pytest.approx(0.0)
    engine.step(0, [2] * 8, None)
    assert engine.metric("utilization_gini", 8) == pytest.approx(3 / 4)  # (n - 1) / n of n = 4 experts
    engine.step(0, [0, 0, 0, 1], None)
    # counts over the last 8: expert 2 x4, 0 x3, 1 x1, 3 x0 -> Gini of (0, 1, 3, 4)
    assert engine.metric("utilization_gini", 8) == pytest.approx(_gini([0, 1, 3, 4]))
    assert math.isnan(engine.metric("utilization_gini", 16))  # longer than the log kept


def test_drift_is_the_total_variation_from_the_first_window():
    engine = make()
    engine.keep_access_log(4)
    engine.step(0, [0, 1, 0, 1], None)  # the baseline: half 0, half 1
    assert math.isnan(engine.metric("drift", 4))  # no window after the baseline yet
    engine.step(0, [1, 0, 1, 0], None)
    assert engine.metric("drift", 4) == pytest.approx(0.0)
    engine.step(0, [0, 0, 2, 3], None)  # {0: 1/2, 2: 1/4, 3: 1/4} against {0: 1/2, 1: 1/2}
    assert engine.metric("drift", 4) == pytest.approx(0.5)
    engine.step(0, [2, 3, 3, 2], None)
    assert engine.metric("drift", 4) == pytest.approx(1.0)


def test_cost_per_token_is_the_cost_models_time_per_token():
    engine = make(L=2, slots=8)
    for _ in range(5):
        for layer in range(2):
            engine.step(layer, [layer, 3], None)
    s = engine.stats()
    assert s["tokens"] == 10
    assert engine.metric("cost_per_token", s["accesses"]) == pytest.approx(s["simulated_us"] / s["tokens"])


def test_adapt_rules_fire_on_the_new_metrics():
    text = """policy p {
        cache { capacity = 4 }
        adapt {
            when drift > 0.9 for 4 accesses { cache.ttl = 7 }
            when utilization_gini > 0.7 for 4 accesses { cache.capacity = 3 }
            when cost_per_token >= 0 for 4 accesses { trigger reset_stats }
        }
    }"""
    engine = make(compile_policy(text))
    engine.step(0, [0, 1, 0, 1], None)
    engine.step(0, [2, 2, 2, 2], None)  # drift 1, Gini (n - 1) / n = 0.75
    fired = {f["metric"] for f in engine.stats()["adapt_firings"]}
    assert fired == {"drift", "utilization_gini", "cost_per_token"}


def test_capacity_factor_drops_routed_pairs_over_an_experts_capacity_in_replay_only():
    policy = CompiledPolicy(name="t", cache=CacheConfig(capacity=4, capacity_factor=1.0))
    with pytest.raises(PolicyError, match="capacity_factor.*replay"):
        make(policy)
    engine = make(policy, replay=True)
    engine.step(0, [0] * 7 + [1], None)  # 8 pairs over 4 experts: each takes at most ceil(1.0 * 8 / 4) = 2
    s = engine.stats()
    assert s["dropped"] == 5 and s["accesses"] == 3
    engine.step(0, [0, 1, 2, 3, 0, 1, 2, 3], None)  # within capacity: nothing dropped
    assert engine.stats()["dropped"] == 5


def test_moe_policylang_examples_of_the_four_constructs_compile():
    p = compile_policy("""policy seed {
        cache { capacity = 8  eviction = lfu  capacity_factor = 1.25 }
        adapt {
            when drift > 0.2 for 200 accesses { eviction = lfu }
            when utilization_gini > 0.85 { eviction = lru }
            when cost_per_token > 0.6e-6 { eviction = score }
        }
    }""")
    assert p.cache.capacity_factor == 1.25
    assert [r.metric for r in p.adapt] == ["drift", "utilization_gini", "cost_per_token"]
    with pytest.raises(PolicyError, match="fraction"):
        compile_policy("policy p { cache { capacity = 2 } adapt { when drift > 1.5 { eviction = lru } } }")
    with pytest.raises(PolicyError, match="capacity_factor"):
        compile_policy("policy p { cache { capacity = 2 capacity_factor = 0 } }")


def _gini(counts):
    xs, n = sorted(counts), len(counts)
    return sum((2 * (i + 1) - n - 1) * x for i, x in enumerate(xs)) / (n * sum(xs))
