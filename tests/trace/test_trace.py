"""Trace format, synthetic workloads, replay, sweep, stats and the `moerun trace` commands."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moerun.policy.ir import CacheConfig, CompiledPolicy, PerLayerConfig
from moerun.policy.errors import PolicyError
from moerun.policy_engine import PolicyEngine
from moerun.trace.format import Trace, TraceError, read_trace, write_trace
from moerun.trace.replay import replay
from moerun.trace.stats import layer_stats
from moerun.trace.sweep import sweep, write_outputs
from moerun.trace.workloads import WORKLOADS, synthetic_trace

LRU = CompiledPolicy(name="lru", cache=CacheConfig(eviction="lru"))


@pytest.mark.parametrize("workload", WORKLOADS)
def test_synthetic_workloads_are_seeded_and_valid(workload):
    a = synthetic_trace(workload, num_tokens=64, num_layers=3, num_experts=12, top_k=3, batch=2, seed=7)
    b = synthetic_trace(workload, num_tokens=64, num_layers=3, num_experts=12, top_k=3, batch=2, seed=7)
    assert np.array_equal(a.expert_ids, b.expert_ids) and a.num_steps == 32
    assert all(len(set(row)) == 3 for row in a.expert_ids.reshape(-1, 3).tolist())  # k distinct


def test_trace_round_trips_and_reader_validates(tmp_path):
    t = synthetic_trace("zipf", num_tokens=32, num_layers=2, num_experts=8, top_k=2)
    path = write_trace(tmp_path / "t.npz", t)
    back = read_trace(path)
    assert np.array_equal(back.expert_ids, t.expert_ids) and back.num_experts == 8 and back.model == t.model
    bad = Trace(expert_ids=t.expert_ids.copy(), gate_weights=t.gate_weights, step_starts=t.step_starts,
                prompt_starts=t.prompt_starts, num_experts=8)
    bad.expert_ids[3, 1, 0] = 9
    with pytest.raises(TraceError, match="expert id 9 is outside 0..7"):
        write_trace(tmp_path / "bad.npz", bad)
    with pytest.raises(TraceError, match="No such file"):
        read_trace(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not a moerun trace"):
        read_trace(tmp_path / "junk.npz")
    with pytest.raises(TraceError, match="2 MoE layers but the model has 3"):
        back.check_model(num_layers=3, num_experts=8)
    with pytest.raises(TraceError, match="model has 4"):
        back.check_model(num_layers=2, num_experts=4)


def test_replay_is_the_engine_stepped_like_the_runtime():
    t = synthetic_trace("temporal", num_tokens=40, num_layers=3, num_experts=10, top_k=2, batch=2, seed=1)
    stats = replay(t, LRU, capacity=6)
    engine = PolicyEngine(LRU, num_layers=3, num_experts=10, top_k=2, num_slots=6, expert_bytes=stats["expert_bytes"])
    for s in range(t.num_steps):
        a, b = t.step_starts[s], t.step_starts[s + 1]
        for layer in range(3):
            engine.step(layer, t.expert_ids[a:b, layer].ravel().tolist(), t.gate_weights[a:b, layer].ravel().tolist())
    live = engine.stats()
    for key in ("hits", "accesses", "demand_fetches", "evictions", "simulated_us"):
        assert live[key] == stats[key], key


def test_replay_errors_name_the_numbers():
    t = synthetic_trace("uniform", num_tokens=8, num_layers=2, num_experts=8, top_k=2)
    with pytest.raises(PolicyError, match="capacity 9 but only 4"):
        replay(t, LRU, capacity=9, num_slots=4)
    with pytest.raises(PolicyError, match="capacity = auto"):
        replay(t, LRU)


def test_per_layer_structure_and_oracle_prefetch_replay():
    t = synthetic_trace("correlated", num_tokens=200, num_layers=4, num_experts=16, top_k=2, seed=2)
    flat = replay(t, LRU, capacity=16)["hit_rate"]
    per_layer = replay(t, CompiledPolicy(name="pl", per_layer=PerLayerConfig(total_budget=16)), capacity=16)
    assert per_layer["capacities"] == [4, 4, 4, 4] and 0 < per_layer["hit_rate"] < 1 and 0 < flat < 1
    from moerun.policy.ir import PrefetchConfig

    look = CompiledPolicy(name="la", prefetch=PrefetchConfig(strategy="lookahead", budget=2))
    s = replay(t, look, capacity=16)
    assert s["prefetches"] > 0 and s["routing_prediction_accuracy"] == 1.0  # oracle predictions


def test_sweep_rows_json_and_png(tmp_path):
    t = synthetic_trace("zipf", num_tokens=100, num_layers=2, num_experts=8, top_k=2)
    rows = sweep(t, [LRU], [2, 4, 8])
    assert {r["policy"] for r in rows} == {"lru", "belady"} and len(rows) == 6
    by = {(r["policy"], r["capacity"]): r["hit_rate"] for r in rows}
    assert all(by[("belady", c)] >= by[("lru", c)] for c in (2, 4, 8))
    assert by[("lru", 8)] >= by[("lru", 2)]
    write_outputs(rows, tmp_path / "s.json", tmp_path / "s.png")
    assert json.loads((tmp_path / "s.json").read_text()) == rows
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_layer_stats_see_skew_and_predictability():
    uni = layer_stats(synthetic_trace("uniform", num_tokens=400, num_layers=2, num_experts=16, top_k=2))
    cor = layer_stats(synthetic_trace("correlated", num_tokens=400, num_layers=2, num_experts=16, top_k=2,
                                      correlation=0.9, zipf_min=0.0, zipf_max=0.01))
    assert uni[0]["entropy_bits"] > 3.9 and uni[0]["skew_top10"] < 0.2
    assert cor[0]["next_layer_predictability"] > uni[0]["next_layer_predictability"] + 0.3
    assert uni[0]["reuse_distance_median"] > 0


def test_trace_commands(tmp_path, capsys):
    from moerun.cli import main

    out = tmp_path / "w.npz"
    assert main(["trace", "synth", "zipf", str(out), "--tokens", "50", "--layers", "2", "--experts", "8",
                 "--top-k", "2"]) == 0
    assert main(["trace", "stats", str(out)]) == 0
    assert "entropy" in capsys.readouterr().out
    assert main(["trace", "stats", str(tmp_path / "nope.npz")]) == 1
    assert "No such file or directory" in capsys.readouterr().err  # errors go to stderr


def test_every_bundled_policy_runs_in_the_engine_and_replays():
    from moerun.policy import bundled_policies, compile_policy

    t = synthetic_trace("bursty", num_tokens=60, num_layers=3, num_experts=12, top_k=2, seed=4)
    for name in bundled_policies():
        policy = compile_policy(name)
        s = replay(t, policy, num_slots=9, capacity=None if policy.cache.capacity else 9)
        assert s["accesses"] == t.num_accesses and 0 <= s["hit_rate"] <= 1, name


def test_trace_replay_and_sweep_commands(tmp_path, capsys):
    from moerun.cli import main

    trace = write_trace(tmp_path / "t.npz", synthetic_trace("zipf", num_tokens=60, num_layers=2, num_experts=8,
                                                            top_k=2))
    policy = tmp_path / "p.moe"
    policy.write_text("version 1\npolicy small {\n  cache {\n    capacity = 4\n    eviction = lru\n  }\n}\n")
    assert main(["trace", "replay", str(trace), "--policy", str(policy)]) == 0
    assert "hit rate" in capsys.readouterr().out
    assert main(["trace", "replay", str(trace), "--policy", str(policy), "--capacity", "9", "--slots", "4"]) == 1
    assert "capacity 9 but only 4" in capsys.readouterr().err
    assert main(["trace", "sweep", str(trace), "--policies", str(policy), "--capacities", "2", "4",
                 "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "belady" in out and (tmp_path / "s.png").exists()
