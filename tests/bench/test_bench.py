"""The bench end to end on CPU with tiny checkpoints, and its parts against plain transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moerun.bench.budget import parse_budget
from moerun.bench.cli import run_bench
from moerun.bench.counters import ExpertCounters
from moerun.bench.limits import uniform_decode_limit
from moerun.bench.measure import token_match
from moerun.bench.models import check_disk_space, inspect_checkpoint, prepare_checkpoint
from moerun.bench.moe_layers import find_experts
from moerun.bench.offloaded_experts import FiddlerExperts, GpuExpertLRU, OnDemandExperts
from moerun.models.synthetic import build_checkpoint, synthetic_config
from moerun.native import slot_layout

BASELINES = ["hf-resident", "hf-auto", "hf-ondemand", "fiddler"]


def _moerun_parts_merged() -> bool:
    """moerun.load needs the policy compiler, the native engine and the mechanism, built in parallel."""
    import importlib.util

    from moerun import native, policy

    mechanism = ("ExpertArena", "HostPool", "TransferEngine", "CpuExecutor")
    return (hasattr(policy, "compile_policy") and importlib.util.find_spec("moerun.policy_engine") is not None
            and all(hasattr(native, name) for name in mechanism))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_checkpoint(synthetic_config(arch), root / arch, seed=3) for arch in ("mixtral", "deepseek_v2")}


def test_cpu_bench_runs_every_baseline_and_matches_reference(tmp_path):
    systems = BASELINES
    results = run_bench([
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
        "--budgets", "experts:40%", "experts:80%",
        "--prompt-len", "8", "--new-tokens", "6", "--repeats", "2", "--systems", *systems,
    ])
    assert {r.system.split(":")[0] for r in results} == set(systems)
    for r in results:
        assert r.status == "ok", (r.system, r.status)
        matched, compared = r.match
        assert compared == 2 * 6 and matched == compared, (r.system, r.match)
        assert r.measurement.decode_tok_s.median > 0 and r.measurement.ttft_ms.median > 0
    by_name = {(r.system, r.budget): r for r in results}
    fiddler = by_name[("fiddler", "experts:40%")].measurement.decode_counters
    assert fiddler.cpu_loads > 0 and fiddler.gpu_hits + fiddler.cpu_loads == fiddler.loads
    ondemand = by_name[("hf-ondemand", "experts:40%")].measurement.decode_counters
    assert ondemand.copied_bytes > 0 and 0 < ondemand.gpu_hits < ondemand.loads <= ondemand.pairs
    assert by_name[("hf-auto", "experts:40%")].measurement.decode_counters.copied_bytes > 0
    resident = by_name[("hf-resident", "-")].measurement
    # tiny qwen2_moe: 2 MoE layers, top-2; 2 repeats of 8 prompt tokens, then 5 decode steps.
    assert resident.prefill_counters.pairs == 2 * 8 * 2 * 2
    assert resident.decode_counters.pairs == 2 * 5 * 2 * 2 == ondemand.pairs
    assert resident.decode_counters.hit_rate == 1.0
    # A larger budget keeps more experts resident.
    assert by_name[("fiddler", "experts:80%")].measurement.decode_counters.hit_rate > fiddler.hit_rate
    [json_path] = (tmp_path / "out").glob("*.json")
    payload = json.loads(json_path.read_text())
    assert payload["model"]["type"] == "qwen2_moe" and len(payload["results"]) == len(results)
    assert list((tmp_path / "out").glob("*.png")), "a budget sweep writes a plot"
    # The cached checkpoint is reused, not rebuilt.
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.skipif(not _moerun_parts_merged(), reason="moerun.load's policy engine or mechanism is not merged yet")
def test_moerun_rows_run_each_policy_and_match_reference(tmp_path):
    small = tmp_path / "two_slots.moe"
    small.write_text("policy two_slots { cache { capacity = 2  eviction = lru } schedule { mode = gpu_only } }\n")
    on_cpu = tmp_path / "cpu_misses.moe"
    on_cpu.write_text("policy cpu_misses { cache { capacity = 2  eviction = lfu } schedule { mode = cpu_fallback } }\n")
    results = run_bench([
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--budget", "experts:50%",
        "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1", "--systems", "hf-resident", "moerun",
        "--policies", str(small), str(on_cpu),
    ])
    rows = {r.system: r for r in results}
    assert set(rows) == {"hf-resident", "moerun:two_slots", "moerun:cpu_misses"}
    for r in results:
        assert r.status == "ok", (r.system, r.status)
        assert r.match == (4, 4), (r.system, r.match)
    assert rows["moerun:two_slots"].measurement.decode_counters.copied_bytes > 0
    assert rows["moerun:cpu_misses"].measurement.decode_counters.cpu_loads > 0


def test_sampled_decoding_draws_the_same_tokens_in_every_system(checkpoints, tmp_path):
    common = ["--model", str(checkpoints["mixtral"]), "--out", str(tmp_path), "--budget", "experts:50%",
              "--prompt-len", "4", "--new-tokens", "6", "--repeats", "1"]
    sampled = run_bench(common + ["--sample", "--systems", "hf-resident", "moerun", "--policies", "balanced"])
    for r in sampled:
        assert r.status == "ok", (r.system, r.status)
        assert r.match == (6, 6), (r.system, r.match)
    greedy = run_bench(common + ["--systems", "hf-resident"])
    assert sampled[0].measurement.tokens != greedy[0].measurement.tokens  # sampling is really on


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_baselines_match_reference_tokens_on_batch(arch, checkpoints, tmp_path):
    results = run_bench([
        "--model", str(checkpoints[arch]), "--out", str(tmp_path), "--budget", "experts:50%", "--batch", "2",
        "--prompt-len", "6", "--new-tokens", "5", "--repeats", "1", "--systems", *BASELINES,
    ])
    for r in results:
        assert r.status == "ok", (r.system, r.status)
        assert r.match == (10, 10), (r.system, r.match)


def test_profile_writes_a_table_and_trace_per_system(checkpoints, tmp_path):
    run_bench([
        "--model", str(checkpoints["mixtral"]), "--out", str(tmp_path), "--budget", "experts:50%",
        "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--systems", "hf-resident", "fiddler",
        "--profile",
    ])
    names = sorted(p.name for p in tmp_path.glob("profile-*"))
    assert names == ["profile-fiddler-experts_50_.json", "profile-fiddler-experts_50_.txt",
                     "profile-hf-resident--.json", "profile-hf-resident--.txt"]
    assert "aten::" in (tmp_path / "profile-fiddler-experts_50_.txt").read_text()


def test_budget_too_small_is_skipped_with_the_reason(checkpoints, tmp_path):
    [row] = run_bench([
        "--model", str(checkpoints["mixtral"]), "--out", str(tmp_path), "--budget", "1KiB",
        "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1", "--systems", "fiddler",
    ])
    assert row.status.startswith("skipped:") and "smallest budget that works" in row.status


def _reference_and_sites(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, experts_implementation="batched_mm")
    return model, find_experts(model)


def test_offloaded_experts_compute_what_transformers_computes(checkpoints):
    model, sites = _reference_and_sites(checkpoints["mixtral"])
    site = sites[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, site.module.gate_up_proj.shape[-1], generator=gen)             # [T, H]
    top_k_index = torch.randint(0, site.module.gate_up_proj.shape[0], (5, 2), generator=gen)  # [T, K]
    top_k_weights = torch.rand(5, 2, generator=gen)                                         # [T, K]
    expected = site.module(hidden, top_k_index, top_k_weights)

    counters = ExpertCounters()
    ondemand = OnDemandExperts(site, torch.device("cpu"), counters, GpuExpertLRU(capacity=2))
    torch.testing.assert_close(ondemand(hidden, top_k_index, top_k_weights), expected)
    unique = top_k_index.unique().numel()
    assert counters.pairs == 10 and counters.loads == unique and counters.gpu_hits == 0
    assert counters.copied_bytes == unique * ondemand.expert_bytes  # a cold cache copies every expert once

    fiddler = FiddlerExperts(site, torch.device("cpu"), ExpertCounters())
    fiddler.place([int(top_k_index[0, 0])])
    torch.testing.assert_close(fiddler(hidden, top_k_index, top_k_weights), expected)
    assert fiddler.counters.gpu_hits == 1 and fiddler.counters.cpu_loads == unique - 1


def test_lru_evicts_the_least_recently_used_expert():
    cache = GpuExpertLRU(capacity=2)
    cache.put((0, 1), "a")
    cache.put((0, 2), "b")
    assert cache.get((0, 1)) == "a"      # (0, 2) is now the least recent
    cache.put((1, 0), "c")
    assert cache.get((0, 2)) is None and cache.get((0, 1)) == "a" and cache.get((1, 0)) == "c"
    with pytest.raises(ValueError, match="at least 1 slot"):
        GpuExpertLRU(0)


def test_budget_forms_resolve_to_bytes():
    sizes = dict(model_bytes=1000, fixed_bytes=300, routed_bytes=800)
    assert parse_budget("10GiB").resolve(**sizes) == 10 * 2**30
    assert parse_budget("1.5 GB").resolve(**sizes) == 1_500_000_000
    assert parse_budget("50%").resolve(**sizes) == 500
    assert parse_budget("experts:25%").resolve(**sizes) == 300 + 200
    for bad in ("ten gigs", "10XB", "0GiB", "experts:0%", ""):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)


def test_token_match_counts_the_common_greedy_prefix():
    reference = [[[1, 2, 3, 4], [5, 6, 7, 8]]]
    assert token_match([[[1, 2, 3, 4], [5, 6, 7, 8]]], reference) == (8, 8)
    assert token_match([[[1, 9, 3, 4], [5, 6, 7, 0]]], reference) == (1 + 3, 8)


def test_checkpoint_sizes_count_experts_and_dense_part(checkpoints):
    info = inspect_checkpoint(checkpoints["deepseek_v2"], torch.float32)
    config = synthetic_config("deepseek_v2")
    assert info.num_experts == config.n_routed_experts
    assert info.num_moe_layers == config.num_hidden_layers - config.first_k_dense_replace
    assert info.expert_bytes == 3 * config.moe_intermediate_size * config.hidden_size * 4
    assert 0 < info.dense_bytes < info.total_bytes


def test_disk_check_says_how_to_fix(tmp_path):
    with pytest.raises(RuntimeError, match="--cache-dir"):
        check_disk_space(tmp_path, 2**60, "building a huge checkpoint")


@pytest.mark.skipif(not _moerun_parts_merged(), reason="moerun.load's policy engine or mechanism is not merged yet")
def test_one_moerun_row_per_expert_format_with_its_slots_and_decode_limit(tmp_path):
    results = run_bench([
        "--synthetic", "tiny", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
        "--budget", "experts:50%", "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1",
        "--systems", "hf-resident", "moerun", "--policies", "balanced", "--expert-format", "int8", "int4-g32",
    ])
    reference, *rows = results
    assert reference.status == "ok" and reference.expert_format == "float"
    assert [(r.system, r.expert_format) for r in rows] == [("moerun:balanced", "int8"), ("moerun:balanced", "int4-g32")]
    for r in rows:
        assert r.status == "ok", r.status
        assert r.slot_bytes == slot_layout(torch.float32, 64, 32, r.expert_format).slot_bytes
        # The float plan's budget for half the experts holds every expert at 8 bits or less.
        assert r.num_slots == 16 and r.limit.misses_per_token == 0
    [json_path] = (tmp_path / "out").glob("*.json")
    saved = json.loads(json_path.read_text())["results"]
    assert [(r["expert_format"], r["num_slots"]) for r in saved[1:]] == [("int8", 16), ("int4-g32", 16)]
    assert saved[1]["slot_bytes"] == rows[0].slot_bytes and "pcie_tok_s" in saved[1]["limit"]


@pytest.mark.skipif(not _moerun_parts_merged(), reason="moerun.load's policy engine or mechanism is not merged yet")
def test_packed_builtin_model_runs_moerun_and_skips_the_baselines(tmp_path):
    results = run_bench([
        "--synthetic", "tiny", "--checkpoint-format", "int4-g32", "--cache-dir", str(tmp_path / "cache"),
        "--out", str(tmp_path / "out"), "--budget", "experts:50%", "--prompt-len", "4", "--new-tokens", "4",
        "--repeats", "1", "--systems", "hf-resident", "fiddler", "moerun", "--policies", "balanced",
        "--routing", "uniform",
    ])
    rows = {r.system: r for r in results}
    for name in ("hf-resident", "fiddler"):
        assert rows[name].status.startswith("skipped: the checkpoint's experts are published packed (int4-g32)")
    moerun_row = rows["moerun:balanced"]
    assert moerun_row.status == "ok" and moerun_row.expert_format == "int4-g32"
    assert "uniform routing" in moerun_row.notes and moerun_row.match is None
    # Half of the 16 experts resident: per token, 2 layers x top-2 x 1/2 misses; the dense part was timed.
    assert moerun_row.num_slots == 8 and moerun_row.limit.misses_per_token == 2.0
    assert moerun_row.limit.dense_ms > 0 and moerun_row.limit.pcie_tok_s < 1e3 / moerun_row.limit.dense_ms
    [cached] = (tmp_path / "cache").iterdir()
    assert "int4-g32" in cached.name


def test_decode_limit_counts_the_misses_of_uniform_routing():
    # 48 layers x 128 experts, top-8, a third resident: 256 misses of 2 MB per token.
    limit = uniform_decode_limit(moe_layers=48, experts=128, top_k=8, num_slots=2048, slot_bytes=2_000_000,
                                 h2d_gbps=50.0, cpu_gbps=25.0, dense_ms=2.0)
    assert limit.misses_per_token == 256.0 and limit.miss_bytes_per_token == 512e6
    assert limit.pcie_tok_s == pytest.approx(1 / (512e6 / 50e9 + 2e-3))
    assert limit.pcie_dram_tok_s == pytest.approx(1 / (512e6 / 75e9 + 2e-3))
    resident = uniform_decode_limit(moe_layers=2, experts=8, top_k=2, num_slots=64, slot_bytes=1, h2d_gbps=1.0)
    assert resident.misses_per_token == 0 and resident.summary()["pcie_tok_s"] is None  # nothing bounds it


def test_packed_builds_are_cached_per_format_and_sized_packed(tmp_path, monkeypatch):
    import shutil

    free = shutil.disk_usage(tmp_path)._replace(free=2**30)
    monkeypatch.setattr("moerun.bench.models.shutil.disk_usage", lambda path: free)
    with pytest.raises(RuntimeError, match=r"int4-g128 experts\) needs 18\.\d\d GiB"):
        prepare_checkpoint("qwen3-30b-a3b", dtype=torch.bfloat16, cache_dir=tmp_path, expert_format="int4")
    with pytest.raises(RuntimeError, match=r"float experts\) needs 60\.\d\d GiB"):
        prepare_checkpoint("qwen3-30b-a3b", dtype=torch.bfloat16, cache_dir=tmp_path)


def test_gpt_oss_builtins_are_mxfp4_as_published_and_the_120b_needs_a_larger_disk(tmp_path, monkeypatch):
    import shutil

    from moerun.bench.models import BUILTIN_MODELS, packed_checkpoint_bytes, spec_config

    spec = BUILTIN_MODELS["gpt-oss-20b"]
    config = spec_config(spec)
    assert spec.checkpoint_format == "mxfp4"
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (24, 32, 4)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"] and config.sliding_window == 128
    total, dense = packed_checkpoint_bytes(config, torch.bfloat16, "mxfp4")
    assert (total - dense) / (24 * 32) == pytest.approx(13.24e6, rel=1e-3)  # one expert: 13.2 MB in MXFP4
    free = shutil.disk_usage(tmp_path)._replace(free=64 * 10**9)  # the single-GPU machine's disk
    monkeypatch.setattr("moerun.bench.models.shutil.disk_usage", lambda path: free)
    with pytest.raises(RuntimeError, match=r"gpt-oss-120b checkpoint \(mxfp4 experts\) needs 64\.\d\d GiB.*"
                                           r"smaller --synthetic model\.$"):
        prepare_checkpoint("gpt-oss-120b", dtype=torch.bfloat16, cache_dir=tmp_path)


def test_prefill_bound_streams_every_expert_a_long_prompt_needs():
    from moerun.bench.limits import distinct_experts, uniform_prefill_bound

    assert distinct_experts(60, 4, 1) == pytest.approx(4)
    assert distinct_experts(60, 4, 2048) == pytest.approx(60)
    bound = uniform_prefill_bound(moe_layers=24, experts=60, top_k=4, num_slots=24 * 30, slot_bytes=10**6,
                                  tokens=2048, h2d_gbps=20.0, cpu_us_per_expert_token=10.0)
    assert bound.stream_bytes == pytest.approx(24 * 30 * 10**6)           # half the experts are resident
    assert bound.pcie_ms == pytest.approx(24 * 30 * 10**6 / 20e9 * 1e3)
    cpu_gbps = 10**6 / (2048 * 4 / 60 * 10.0 * 1e3)                         # one expert's bytes over its tokens' time
    assert bound.cpu_gbps == pytest.approx(cpu_gbps)
    assert bound.pcie_cpu_ms == pytest.approx(24 * 30 * 10**6 / ((20.0 + cpu_gbps) * 1e9) * 1e3)


@pytest.mark.skipif(not _moerun_parts_merged(), reason="moerun.load's policy engine or mechanism is not merged yet")
def test_several_prompt_lengths_report_ttft_beside_the_bound(checkpoints, tmp_path):
    results = run_bench([
        "--model", str(checkpoints["mixtral"]), "--out", str(tmp_path), "--budget", "experts:50%",
        "--prompt-len", "4", "12", "--new-tokens", "3", "--repeats", "1", "--routing", "uniform",
        "--systems", "moerun", "--policies", "balanced",
    ])
    [row] = results
    assert row.status == "ok", row.status
    assert [p.prompt_len for p in row.prefill] == [4, 12]
    for point in row.prefill:
        assert point.ttft_ms.median > 0 and point.bound is not None and point.bound.tokens == point.prompt_len
    assert row.prefill[1].bound.experts_per_layer > row.prefill[0].bound.experts_per_layer
    # Uniform routing reaches the prefill: the prompts' forwards counted experts on transformers' layers.
    assert row.prefill[1].counters.pairs == 12 * 2 * 2     # 12 tokens x 2 MoE layers x top-2
    [json_path] = tmp_path.glob("*.json")
    [summary] = json.loads(json_path.read_text())["results"]
    assert [p["prompt_len"] for p in summary["prefill_lengths"]] == [4, 12]
    assert summary["prefill_lengths"][1]["streaming_bound"]["pcie_ms"] >= 0


@pytest.mark.parametrize("routing", ["model", "uniform"])
def test_a_gpt_oss_mxfp4_checkpoint_runs_through_the_bench(tmp_path, routing):
    # The bench reads the checkpoint's quantization as the loader does (stacked MXFP4 experts), so the
    # gpt-oss built-ins, generated in that layout, run; the baselines cannot load packed experts.
    from moerun.models.synthetic import build_packed_checkpoint

    path = build_packed_checkpoint(synthetic_config("gpt_oss"), tmp_path / "ckpt", expert_format="mxfp4",
                                   dtype=torch.float32, seed=3)
    info = inspect_checkpoint(path)
    assert info.expert_format == "mxfp4"
    assert info.expert_bytes == slot_layout(torch.float32, 64, 64, "mxfp4", bias=True).slot_bytes
    results = run_bench([
        "--model", str(path), "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "out"),
        "--budget", "experts:50%", "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1",
        "--systems", "hf-resident", "moerun", "--policies", "balanced", "--routing", routing])
    rows = {r.system: r for r in results}
    assert rows["hf-resident"].status.startswith("skipped: the checkpoint's experts are published packed (mxfp4)")
    row = rows["moerun:balanced"]
    assert row.status == "ok" and row.expert_format == "mxfp4" and row.measurement.decode_tok_s.low > 0
