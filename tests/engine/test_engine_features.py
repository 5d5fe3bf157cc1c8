"""Each policy feature of the native engine, through the Python API the runtime uses."""
from __future__ import annotations

from dataclasses import replace

import pytest

from moerun.policy.ir import (AdaptRule, CacheConfig, CompiledPolicy, PerLayerConfig, PrefetchConfig,
                                  ScheduleConfig)
from moerun.policy.errors import PolicyError
from moerun.policy_engine import CostModel, PolicyEngine


def make(cache=CacheConfig(), *, L=2, E=8, K=1, slots=None, bytes_=1000, cost=None, **kw):
    policy = CompiledPolicy(name="t", cache=cache, **kw)
    slots = slots or (cache.capacity or 4)
    return PolicyEngine(policy, num_layers=L, num_experts=E, top_k=K, num_slots=slots, expert_bytes=bytes_,
                        cost=cost)


def resident(engine, layer, E=8):
    return {e for e in range(E) if engine.lookup(layer, e) >= 0}


def test_capacity_above_slots_is_a_policy_error_with_both_numbers():
    with pytest.raises(PolicyError, match=r"capacity 9.*only 4 GPU expert slots"):
        make(CacheConfig(capacity=9), slots=4)


def test_belady_only_in_replay_and_bad_ids_raise():
    with pytest.raises(PolicyError, match="belady"):
        make(CacheConfig(capacity=2, eviction="belady"))
    engine = make(CacheConfig(capacity=2))
    with pytest.raises(ValueError, match="expert id 8 out of range.*8 experts"):
        engine.step(0, [8], [1.0])
    with pytest.raises(ValueError, match="layer 5 out of range"):
        engine.step(5, [1], [1.0])
    with pytest.raises(ValueError, match="2 expert ids but 1 gate weights"):
        engine.step(0, [1, 2], [1.0])


def test_plan_reports_hits_fetches_victims_and_is_reused():
    engine = make(CacheConfig(capacity=2))
    p = engine.step(0, [1, 2], None)
    assert p.fetches == [(1, 0, -1, -1), (2, 1, -1, -1)] and p.hits == []
    p2 = engine.step(0, [1, 3], None)
    assert p2 is p
    assert p.hits == [(1, 0)] and p.fetches == [(3, 1, 0, 2)]  # 2 was least recently used
    assert p.num_hits == 1 and p.num_fetches == 1


def test_plan_counts_agree_with_its_lists():
    engine = make(CacheConfig(capacity=2), K=3, slots=2, schedule=ScheduleConfig(mode="hybrid"))
    for ids in ([1, 2, 3], [1, 4, 5], [3, 3, 6], [7, 1, 2]):
        p = engine.step(0, ids, None)
        cpu = [e for (e,) in p.cpu]
        assert p.cpu_experts == cpu and p.cpu_pairs == sum(i in cpu for i in ids)
        assert p.counts == (len(p.hits), len(p.fetches), sum(f[2] >= 0 for f in p.fetches), len(p.cpu),
                            p.cpu_pairs, len(p.prefetches), sum(x[3] >= 0 for x in p.prefetches))


def test_step_never_evicts_its_own_experts_and_overflows_to_cpu():
    engine = make(CacheConfig(capacity=2), K=3, slots=2)
    p = engine.step(0, [1, 2, 3], None)
    assert len(p.fetches) == 2 and p.cpu == [(3,)]
    assert engine.stats()["overflow"] == 1
    # with a spare slot, the excess is staged for this step and released after it
    engine = make(CacheConfig(capacity=2), K=3, slots=3)
    p = engine.step(0, [1, 2, 3], None)
    assert p.cpu == [] and p.releases == [(2, 0, 3)]
    assert resident(engine, 0) == {1, 2}


def test_pinned_expert_is_never_evicted():
    engine = make(CacheConfig(capacity=2, pin=((0, 1),)))
    engine.step(0, [1], None)
    for e in (2, 3, 4, 5):
        engine.step(0, [e], None)
    assert 1 in resident(engine, 0)


def test_ttl_releases_unused_experts():
    engine = make(CacheConfig(capacity=4, ttl=2))
    engine.step(0, [1], None)
    engine.step(0, [2], None)
    p = engine.step(0, [3], None)  # expert 1 unused for 2 accesses: still there (ttl is exclusive)
    p = engine.step(0, [4], None)
    assert (0, 0, 1) in p.releases and 1 not in resident(engine, 0)


def test_lfu_with_decay_forgets_old_favourites():
    plain = make(CacheConfig(capacity=2, eviction="lfu"))
    decayed = make(CacheConfig(capacity=2, eviction="lfu", frequency_decay=0.5))
    for engine in (plain, decayed):
        for _ in range(5):
            engine.step(0, [1], None)
        engine.step(0, [2], None)
        engine.step(0, [2], None)
        engine.step(0, [3], None)  # victim: 1 (old, decayed) or 2 (fewer uses)
    assert resident(plain, 0) == {1, 3}
    assert resident(decayed, 0) == {2, 3}


def test_score_evicts_lowest_gate_weight_ema():
    engine = make(CacheConfig(capacity=2, eviction="score", score_ema_alpha=1.0))
    engine.step(0, [1], [0.9])
    engine.step(0, [2], [0.1])
    engine.step(0, [1], [0.9])
    engine.step(0, [3], [0.5])
    assert resident(engine, 0) == {1, 3}


def test_freq_threshold_protects_frequent_experts():
    engine = make(CacheConfig(capacity=2, eviction="freq_threshold", freq_threshold=2, freq_window=10))
    engine.step(0, [1], None)
    engine.step(0, [1], None)  # 1: two uses in the window -> protected
    engine.step(0, [2], None)
    engine.step(0, [3], None)  # LRU would evict 1; freq_threshold evicts 2
    assert resident(engine, 0) == {1, 3}


def test_watermark_evicts_down_to_low_watermark():
    engine = make(CacheConfig(capacity=10, eviction="watermark", high_watermark=0.5, low_watermark=0.2), E=16,
                  slots=10)
    released = []
    for e in range(6):
        released += engine.step(0, [e], None).releases
    assert len(resident(engine, 0, 16)) <= 5
    assert released and engine.stats()["releases"] == len(released)


def test_memory_trigger_evicts_to_headroom():
    gib = 1 << 30
    engine = make(CacheConfig(capacity=8, memory_budget_gb=4.0, memory_threshold=0.9, memory_headroom=0.5),
                  slots=8, bytes_=gib)
    for e in range(3):
        engine.step(0, [e], None)
    assert len(resident(engine, 0)) == 3  # 3 GiB: under 0.9 x 4 GiB
    p = engine.step(0, [3], None)
    assert len(resident(engine, 0)) == 2 and len(p.releases) == 2  # 4 GiB -> down to 0.5 x 4 GiB


def test_per_layer_uniform_partitions_are_independent():
    engine = make(CacheConfig(capacity=4), per_layer=PerLayerConfig(total_budget=4), slots=4)
    assert engine.stats()["capacities"] == [2, 2]
    for e in range(4):
        engine.step(1, [e], None)
    engine.step(0, [7], None)
    engine.step(0, [6], None)
    assert resident(engine, 0) == {6, 7} and len(resident(engine, 1)) == 2


def test_per_layer_entropy_allocation_follows_routing_within_bounds():
    pl = PerLayerConfig(allocation="entropy", total_budget=12, min_capacity=2, max_capacity=8,
                        rebalance_interval=20, entropy_window=100)
    engine = make(CacheConfig(capacity=12), per_layer=pl, L=3, E=16, slots=12)
    assert engine.stats()["capacities"] == [4, 4, 4]
    for t in range(40):
        engine.step(0, [0], None)            # one expert: entropy 0
        engine.step(1, [t % 16], None)       # uniform: 4 bits
        engine.step(2, [t % 4], None)        # 2 bits
    caps = engine.stats()["capacities"]
    assert sum(caps) == 12 and caps[0] == 2 and caps[1] > caps[2] and max(caps) <= 8


def test_affinity_prefetch_learns_transitions_and_respects_budget():
    engine = make(CacheConfig(capacity=6), prefetch=PrefetchConfig(strategy="affinity", budget=1), E=8, slots=6)
    for _ in range(5):
        engine.step(0, [1], None)
        engine.step(1, [5], None)
    p = engine.step(0, [1], None)
    assert all(x[:2] != (1, 5) for x in p.prefetches)  # 5 is resident at layer 1 already
    engine2 = make(CacheConfig(capacity=2), prefetch=PrefetchConfig(strategy="affinity", budget=1), slots=2)
    for t in range(6):
        engine2.step(0, [t % 2 + 1], None)
        engine2.step(1, [t % 2 + 3], None)
    p = engine2.step(0, [1], None)
    assert len(p.prefetches) <= 1
    if p.prefetches:
        layer, expert, slot, vl, ve = p.prefetches[0]
        assert (layer, expert) == (1, 3) and (vl, ve) != (0, 1)  # never evicts what layer 0 needs


def test_lookahead_prefetch_uses_predictions_and_scores_accuracy():
    engine = make(CacheConfig(capacity=4), prefetch=PrefetchConfig(strategy="lookahead", budget=2), E=8, K=2,
                  slots=4)
    engine.observe_prediction(1, [6, 7, 5])
    p = engine.step(0, [1, 2], None)
    assert [(l, e) for l, e, *_ in p.prefetches] == [(1, 6), (1, 7)]
    p = engine.step(1, [6, 0], None)
    assert (6, engine.lookup(1, 6)) in p.hits
    s = engine.stats()
    assert s["prefetch_used"] == 1 and s["routing_prediction_accuracy"] == pytest.approx(1 / 3)


def test_prefetch_ahead_between_steps_issues_predicted_experts_and_scores_accuracy():
    engine = make(CacheConfig(capacity=4), prefetch=PrefetchConfig(strategy="lookahead", budget=2), E=8, K=2,
                  slots=4)
    p = engine.step(0, [1, 2], None)
    assert p.prefetches == []  # nothing predicted before the step
    p = engine.prefetch_ahead(1, [6, 7, 5])
    assert [(l, e) for l, e, *_ in p.prefetches] == [(1, 6), (1, 7)] and p.hits == [] and p.fetches == []
    assert engine.lookup(0, 1) >= 0 and engine.lookup(0, 2) >= 0  # two free slots: nothing evicted
    p = engine.step(1, [6, 0], None)
    assert (6, engine.lookup(1, 6)) in p.hits
    s = engine.stats()
    assert s["prefetch_used"] == 1 and s["routing_prediction_accuracy"] == pytest.approx(1 / 3)
    assert engine.prefetch_ahead(0, [3]).prefetches == []  # layer 0 has no step before it
    # under another strategy the ids only count toward the accuracy
    other = make(CacheConfig(capacity=4), prefetch=PrefetchConfig(strategy="history", budget=2), E=8, K=2, slots=4)
    other.step(0, [1, 2], None)
    assert other.prefetch_ahead(1, [6, 7]).prefetches == []
    other.step(1, [6, 0], None)
    assert other.stats()["routing_prediction_accuracy"] == pytest.approx(1 / 2)


def test_learned_prefetch_ranks_by_score():
    engine = make(CacheConfig(capacity=4), prefetch=PrefetchConfig(strategy="learned", budget=1), slots=4)
    engine.observe_prediction(1, [3, 4], [0.1, 0.9])
    p = engine.step(0, [1], None)
    assert [(l, e) for l, e, *_ in p.prefetches] == [(1, 4)]


def test_history_prefetch_uses_co_occurrence_window():
    fresh = make(CacheConfig(capacity=2), prefetch=PrefetchConfig(strategy="history", budget=1, history_window=4),
                 slots=2)
    fresh.step(0, [2], None)
    fresh.step(1, [6], None)
    fresh.step(0, [3], None)
    fresh.step(1, [5], None)   # cache now {3@0, 5@1}
    p = fresh.step(0, [2], None)
    assert [(l, e) for l, e, *_ in p.prefetches] == [(1, 6)]


def test_schedules_gpu_only_cpu_fallback_and_hybrid_cost_model():
    gpu = make(CacheConfig(capacity=2), schedule=ScheduleConfig(mode="gpu_only"))
    assert gpu.step(0, [1], None).num_fetches == 1
    cpu = make(CacheConfig(capacity=2), schedule=ScheduleConfig(mode="cpu_fallback"))
    p = cpu.step(0, [1], None)
    assert p.cpu == [(1,)] and p.fetches == [] and cpu.stats()["cpu_share"] == 1.0
    slow_copy = CostModel(h2d_gbps=0.001, cpu_us_per_expert_token=10)
    hyb = make(CacheConfig(capacity=2), schedule=ScheduleConfig(mode="hybrid"), cost=slow_copy, bytes_=10**7)
    assert hyb.step(0, [1], None).cpu == [(1,)]
    fast_copy = CostModel(h2d_gbps=1000, cpu_us_per_expert_token=10**4)
    hyb = make(CacheConfig(capacity=2), schedule=ScheduleConfig(mode="hybrid"), cost=fast_copy, bytes_=10**7)
    p = hyb.step(0, [1], None)
    assert p.num_fetches == 1 and p.predicted_us > 0
    # observed copies 100x slower than the model: the model re-estimates and turns to the CPU
    for _ in range(60):
        hyb.observe_timing(0, layer_us=5 * p.predicted_us, copy_us=10**6, copy_bytes=10**7)
    s = hyb.stats()
    assert s["cost_model"]["h2d_gbps"] < 1 and s["cost_prediction_error"] > 0
    assert hyb.step(0, [2], None).cpu == [(2,)]


def test_adapt_rule_changes_parameters_in_place_and_logs_firings():
    rule = AdaptRule(metric="hit_rate", op="<", threshold=0.5, window=4,
                     assignments=(("cache.eviction", "lfu"), ("prefetch.budget", 2)))
    engine = make(CacheConfig(capacity=2), adapt=(rule,))
    for e in range(6):
        engine.step(0, [e], None)
    s = engine.stats()
    assert s["adapt_firing_count"] >= 1
    f = s["adapt_firings"][0]
    assert f["metric"] == "hit_rate" and f["value"] < 0.5 and f["access"] == 4
    assert len(resident(engine, 0)) == 2  # cache contents kept


def test_adapt_rule_rejects_parameters_the_engine_cannot_change():
    rule = AdaptRule(metric="hit_rate", op="<", threshold=0.5, window=4, assignments=(("monitor.window", 3),))
    with pytest.raises(PolicyError, match="cannot change 'monitor.window'"):
        make(CacheConfig(capacity=2), adapt=(rule,))


def test_set_policy_keeps_contents_and_shrinks_with_releases():
    engine = make(CacheConfig(capacity=4), slots=4)
    for e in range(4):
        engine.step(0, [e], None)
    engine.set_policy(replace(engine.policy, cache=CacheConfig(capacity=2, eviction="lfu")))
    assert len(resident(engine, 0)) == 2 and engine.stats()["capacities"] == [2]
    kept = resident(engine, 0)
    p = engine.step(0, sorted(kept)[:1], None)  # the shrink's releases come with the next plan
    assert len(p.releases) == 2 and {e for _, _, e in p.releases} == {0, 1, 2, 3} - kept
    engine.reset()
    assert resident(engine, 0) == set() and engine.stats()["accesses"] == 0


def test_step_reads_numpy_arrays_and_rejects_float_ids():
    import numpy as np

    engine = make(CacheConfig(capacity=4), K=2, slots=4)
    p = engine.step(0, np.array([1, 2], np.int64), np.array([0.5, 0.5], np.float32))
    assert p.num_fetches == 2
    p = engine.step(0, np.array([[1, 3]], np.int32), np.array([[0.5, 0.5]]))
    assert p.hits == [(1, engine.lookup(0, 1))]
    with pytest.raises((TypeError, ValueError)):
        engine.step(0, np.array([1.5, 2.0]), None)


def test_batched_step_counts_accesses_per_pair():
    engine = make(CacheConfig(capacity=4), K=2, slots=4)
    engine.step(0, [1, 2, 1, 3], [0.5] * 4)   # two tokens, expert 1 twice
    s = engine.stats()
    assert s["accesses"] == 4 and s["demand_fetches"] == 3
    engine.step(0, [1, 2, 1, 2], None)
    assert engine.stats()["hits"] == 4


def test_cpu_fallback_places_the_most_used_experts_fiddler_style():
    # Misses run on the CPU, yet the cache fills in the background and, under LFU without decay,
    # settles on the most used experts: expert 5 (3 uses per round) displaces 1 (1 use per round).
    engine = make(CacheConfig(capacity=2, eviction="lfu"), slots=2,
                  schedule=ScheduleConfig(mode="cpu_fallback"))
    p = engine.step(0, [1], None)
    assert p.cpu == [(1,)] and p.fetches == [] and p.prefetches == [(0, 1, 0, -1, -1)]
    for _ in range(3):
        for e in (1, 2, 5, 5, 5, 2):
            plan = engine.step(0, [e], None)
            assert plan.fetches == []  # never a demand copy: a miss always runs on the CPU
    assert resident(engine, 0) == {2, 5}
    stats = engine.stats()
    assert stats["demand_fetches"] == 0 and stats["admissions"] >= 3
    assert engine.step(0, [5], None).hits == [(5, engine.lookup(0, 5))]


def test_cpu_fallback_under_lru_admits_only_into_free_slots():
    engine = make(CacheConfig(capacity=1, eviction="lru"), slots=1, schedule=ScheduleConfig(mode="cpu_fallback"))
    engine.step(0, [1], None)
    assert resident(engine, 0) == {1}
    p = engine.step(0, [2], None)
    assert p.cpu == [(2,)] and p.prefetches == [] and resident(engine, 0) == {1}


def test_warm_places_experts_without_counting_an_access_and_respects_capacity():
    engine = make(CacheConfig(capacity=3), slots=4)
    slots = [engine.warm(0, e) for e in range(4)]
    assert sorted(slots[:3]) == sorted(set(slots[:3])) and min(slots[:3]) >= 0
    assert slots[3] == -1  # the policy's capacity (3), not the arena's 4 slots
    assert engine.warm(0, 0) == -1  # already resident
    assert engine.stats()["accesses"] == 0 and resident(engine, 0) == {0, 1, 2}
    plan = engine.step(0, [1], [1.0])
    assert plan.hits == [(1, slots[1])] and not plan.fetches
    with pytest.raises(IndexError, match="out of range"):
        engine.warm(2, 0)


def test_adapt_firings_name_the_rules_of_the_policy_they_fired_under_after_a_swap():
    rule = AdaptRule(metric="hit_rate", op="<", threshold=0.99, window=4, assignments=(("cache.eviction", "lru"),))
    engine = make(CacheConfig(capacity=2), adapt=(rule,))
    for e in range(8):
        engine.step(0, [e], [1.0])
    fired = engine.stats()["adapt_firings"]
    assert fired and fired[0]["metric"] == "hit_rate" and fired[0]["policy"] == "t"
    engine.set_policy(CompiledPolicy(name="plain", cache=CacheConfig(capacity=2)))  # no adapt rules
    engine.step(0, [1], [1.0])
    after = engine.stats()["adapt_firings"]
    assert after[: len(fired)] == fired  # still described by the policy that had the rule
