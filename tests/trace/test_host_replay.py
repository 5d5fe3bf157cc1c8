"""Trace replay with the host tier behind the GPU tier: host hit rate for a host capacity."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moerun.policy.errors import PolicyError
from moerun.policy.ir import CacheConfig, CompiledPolicy, HostConfig
from moerun.trace.format import write_trace
from moerun.trace.replay import replay
from moerun.trace.workloads import synthetic_trace


def _policy(host: HostConfig | None = None) -> CompiledPolicy:
    return CompiledPolicy(name="p", cache=CacheConfig(capacity=6, eviction="lru"), host=host)


def test_host_tier_reads_every_gpu_miss_once_when_it_holds_every_expert():
    t = synthetic_trace("zipf", num_tokens=120, num_layers=3, num_experts=12, top_k=2, seed=3)
    s = replay(t, _policy(), host_capacity=3 * 12)
    host = s["host"]
    # The host tier sees what the runtime reads from the pool: every GPU copy and CPU run.
    assert host["accesses"] == s["demand_fetches"] + s["prefetches"] + s["cpu_experts"]
    # Holding every expert, it only misses the first read of each (layer, expert) the trace routes to.
    distinct = len({(layer, int(e)) for layer in range(3) for e in np.unique(t.expert_ids[:, layer, :])})
    assert host["misses"] == distinct
    assert host["disk_bytes"] == distinct * s["expert_bytes"]
    assert "host" not in replay(t, _policy())  # no host capacity: no host tier


def test_lru_host_hit_rate_grows_with_capacity_and_policy_block_sets_it():
    t = synthetic_trace("temporal", num_tokens=300, num_layers=4, num_experts=16, top_k=2, seed=5)
    rates = [replay(t, _policy(), host_capacity=c)["host"]["hit_rate"] for c in (4, 16, 32, 64)]
    assert rates == sorted(rates) and rates[0] < rates[-1]  # LRU: a larger cache holds a superset
    from_block = replay(t, _policy(HostConfig(capacity=16, eviction="lfu")))["host"]
    assert from_block["capacity"] == 16 and 0.0 <= from_block["hit_rate"] <= 1.0


def test_replay_command_prints_the_host_tier(tmp_path, capsys):
    from moerun.cli import main

    out = tmp_path / "w.npz"
    assert main(["trace", "synth", "zipf", str(out), "--tokens", "60", "--layers", "2", "--experts", "8",
                 "--top-k", "2"]) == 0
    capsys.readouterr()
    policy = "policy p { cache { capacity = 4  eviction = lru } }"
    assert main(["trace", "replay", str(out), "--policy", policy, "--host-capacity", "6"]) == 0
    assert "host tier    hit rate" in capsys.readouterr().out
    assert main(["trace", "replay", str(out), "--policy", policy]) == 0
    assert "host tier" not in capsys.readouterr().out


def test_sweep_rows_carry_the_host_hit_rate(tmp_path, capsys):
    from moerun.cli import main

    out = tmp_path / "w.npz"
    assert main(["trace", "synth", "zipf", str(out), "--tokens", "60", "--layers", "2", "--experts", "8",
                 "--top-k", "2"]) == 0
    rows_json = tmp_path / "rows.json"
    assert main(["trace", "sweep", str(out), "--policies", "policy p { cache { eviction = lru } }",
                 "--capacities", "2", "4", "--host-capacity", "6", "--json", str(rows_json)]) == 0
    assert "host hit" in capsys.readouterr().out
    rows = json.loads(rows_json.read_text())
    assert all(0.0 <= r["host_hit_rate"] <= 1.0 for r in rows) and len(rows) == 4  # lru + belady, 2 capacities


def test_host_capacity_outside_top_k_to_every_expert_is_refused_with_the_range(tmp_path, capsys):
    from moerun.cli import main

    out = write_trace(tmp_path / "w.npz", synthetic_trace("zipf", num_tokens=40, num_layers=2, num_experts=8, top_k=2,
                                                          seed=1))
    policy = "policy p { cache { capacity = 4  eviction = lru } }"
    for value in ("100000", "17", "1"):  # above 2 layers x 8 experts (was clamped to 16), below top_k (was run)
        for argv in (["trace", "replay", str(out), "--policy", policy],
                     ["trace", "sweep", str(out), "--policies", policy, "--capacities", "4"]):
            assert main([*argv, "--host-capacity", value]) == 1
            printed, err = capsys.readouterr()
            assert printed == "" and f"error: --host-capacity {value} is outside 2..16" in err, err
    assert main(["trace", "replay", str(out), "--policy", policy, "--host-capacity", "16"]) == 0
    assert "with 16 experts in host memory" in capsys.readouterr().out
    t = synthetic_trace("zipf", num_tokens=40, num_layers=2, num_experts=8, top_k=2, seed=1)
    with pytest.raises(PolicyError, match="policy 'p' has host capacity 1, which is below the trace's top_k = 2"):
        replay(t, _policy(HostConfig(capacity=1)))
    with pytest.raises(PolicyError, match="host capacity 1 is below the trace's top_k = 2"):
        replay(t, _policy(), host_capacity=1)
