"""Real shapes on a CUDA device: token identity with transformers and peak memory within budget.

Random-weight checkpoints with the shapes of published models, cut to a few layers so each test
takes seconds. The identity test runs in fp32 (the kernels accumulate in fp32 and transformers'
fp32 matmuls are exact to the last bits that matter for argmax); the memory test runs in bf16.
Decoding takes the fast path (CUDA graphs, on by default on CUDA); the bf16 fast-path test holds its
graphs to the transformers path over the same static cache, which runs the same kernels eagerly.
"""
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, StaticCache

import moerun
from moerun.models.synthetic import build_checkpoint, synthetic_config

pytestmark = pytest.mark.gpu
PRESETS = [("qwen1.5-moe-a2.7b", {}), ("deepseek-v2-lite", dict(num_hidden_layers=3)),
           ("olmoe-1b-7b", {})]


@pytest.fixture(scope="module", params=PRESETS, ids=[p[0] for p in PRESETS])
def fp32_checkpoint(request, tmp_path_factory):
    name, overrides = request.param
    cfg = synthetic_config(name, **{"num_hidden_layers": 2, **overrides})
    return build_checkpoint(cfg, tmp_path_factory.mktemp(name), seed=0, dtype=torch.float32, device="cuda")


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    """Each test's models (arena, graphs, caches) are gone before the next measures memory."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def qwen_bf16(tmp_path_factory):
    """Qwen1.5-MoE-A2.7B shapes cut to 4 layers, bf16, sampled on the GPU once for the module."""
    cfg = synthetic_config("qwen1.5-moe-a2.7b", num_hidden_layers=4)
    return build_checkpoint(cfg, tmp_path_factory.mktemp("qwen_bf16"), seed=0, dtype=torch.bfloat16, device="cuda")


def test_real_shapes_greedy_matches_transformers(fp32_checkpoint):
    prompt = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    ref_model = AutoModelForCausalLM.from_pretrained(fp32_checkpoint, dtype=torch.float32).cuda()
    ref = ref_model.generate(prompt, max_new_tokens=16, do_sample=False)
    del ref_model
    torch.cuda.empty_cache()
    plan = moerun.memory_plan(fp32_checkpoint, vram_budget=1 << 40, max_context=256)
    total_slots = plan.num_slots
    budget = plan.fixed_bytes + (total_slots // 3) * plan.slot_bytes  # a third of the experts fit
    model = moerun.load(fp32_checkpoint, policy="policy p { cache { eviction = lru } }",
                        vram_budget=budget, max_context=256, progress=False)
    out = model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, ref)
    assert model.moerun.stats()["evictions"] > 0
    assert model.moerun.stats()["decode"]["graph_replays"] > 0


@pytest.mark.parametrize("mode", ["gpu_only", "cpu_fallback", "lookahead"])
def test_fast_path_graphs_match_the_transformers_path_in_bf16(mode, qwen_bf16, record_prefetch_ahead):
    path = qwen_bf16
    plan = moerun.memory_plan(path, vram_budget=1 << 40, max_context=256)
    budget = plan.fixed_bytes + (plan.num_slots // 4) * plan.slot_bytes  # every step misses
    policy = ("policy p { cache { eviction = lru } prefetch { strategy = lookahead budget = 4 } }" if mode == "lookahead"
              else f"policy p {{ cache {{ eviction = lru }} schedule {{ mode = {mode} }} }}")
    model = moerun.load(path, policy=policy, vram_budget=budget, max_context=256, progress=False)
    calls = record_prefetch_ahead(model)
    prompt = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    kw = dict(max_new_tokens=48, min_new_tokens=48, do_sample=False)
    fast = model.generate(prompt, **kw)
    fast_calls = list(calls)
    again = model.generate(prompt, **kw)  # graphs reused across generate() calls
    decode = model.moerun.stats()["decode"]
    assert decode["graphs"] > 0 and decode["graph_replays"] > 2 * decode["graphs"]
    if mode == "cpu_fallback":
        assert model.moerun.stats()["cpu_experts"] > 0
    model.moerun.fast_decode = False
    cache = StaticCache(config=model.config, max_cache_len=256)
    calls.clear()
    ref = model.generate(prompt, past_key_values=cache, disable_compile=True, **kw)
    assert torch.equal(fast, ref) and torch.equal(again, ref)
    if mode == "lookahead":  # the predict_next segments' predictions are the layer hooks' ones, in the same order
        assert model.moerun.stats()["prefetches"] > 0 and len(fast_calls) == len(calls) > 0
        assert all(lf == lt and torch.equal(f, t) for (lf, f), (lt, t) in zip(fast_calls, calls))


@pytest.mark.parametrize("budget", ["resident", "evicting"])
def test_compiled_segments_match_the_transformers_path_in_bf16(budget, qwen_bf16):
    # Inductor fuses the segments' small ops (rounding as eager does: emulate_precision_casts);
    # resident: every step is one whole-step graph; evicting: a graph pair per layer around the plan.
    path = qwen_bf16
    plan = moerun.memory_plan(path, vram_budget=1 << 40, max_context=256)
    slots = plan.num_slots if budget == "resident" else plan.num_slots // 4
    model = moerun.load(path, policy="policy p { cache { eviction = lru } }", compile_decode=True,
                        vram_budget=plan.fixed_bytes + slots * plan.slot_bytes, max_context=256, progress=False)
    prompt = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    fast = model.generate(prompt, **kw)
    decode = model.moerun.stats()["decode"]
    assert decode["graph_replays"] > 0
    assert decode["whole_steps"] == (decode["fast_steps"] if budget == "resident" else 0)
    model.moerun.fast_decode = False
    cache = StaticCache(config=model.config, max_cache_len=256)
    ref = model.generate(prompt, past_key_values=cache, disable_compile=True, **kw)
    assert torch.equal(fast, ref)


def test_peak_gpu_memory_stays_within_budget(qwen_bf16):
    path = qwen_bf16
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    budget = 3 << 30
    model = moerun.load(path, vram_budget=budget, max_context=1024, progress=False)
    prompt = torch.randint(3, 1000, (1, 512), generator=torch.Generator().manual_seed(0)).cuda()
    model.generate(prompt, max_new_tokens=64, do_sample=False)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= budget, f"peak {peak} bytes over the budget {budget}"
    assert model.moerun.stats()["decode"]["graph_replays"] > 0  # the fast path's graphs are counted
    after_first = torch.cuda.max_memory_allocated()
    model.generate(prompt[:, :8], max_new_tokens=64, do_sample=False)
    assert torch.cuda.max_memory_allocated() == after_first  # flat after the first run


def test_gpu_memory_is_flat_across_1000_decode_steps(qwen_bf16):
    # After start-up and a first generation (graphs captured, buffers sized), 1000 sampled decode steps
    # that keep fetching and evicting allocate nothing: the arena, the static cache and the graph pool
    # are reused.
    path = qwen_bf16
    plan = moerun.memory_plan(path, vram_budget=1 << 40, max_context=1100)
    model = moerun.load(path, policy="balanced", vram_budget=plan.fixed_bytes + (plan.num_slots // 4) * plan.slot_bytes,
                        max_context=1100, progress=False)
    prompt = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    model.generate(prompt, max_new_tokens=16, do_sample=False)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    model.generate(prompt, max_new_tokens=1000, min_new_tokens=1000, do_sample=True, top_k=0)
    torch.cuda.synchronize()
    stats = model.moerun.stats()
    assert stats["decode"]["fast_steps"] >= 1000 and stats["fetches"] > 100 and stats["evictions"] > 100
    assert torch.cuda.memory_allocated() == allocated
    # Within the run only generate()'s own per-step tensors (logits of one token, the growing ids and
    # mask) come and go; the caching allocator may add a small segment for them (2 MiB seen on the H100).
    assert torch.cuda.max_memory_allocated() - allocated < 16 << 20
    assert torch.cuda.memory_reserved() - reserved <= 16 << 20


def test_whole_step_graphs_hand_the_engine_each_steps_own_routing(qwen_bf16, tmp_path):
    # Whole-step graphs leave each layer's routing in pinned buffers that the engine reads one step later,
    # after the step's end event: read any sooner, it would see the previous step's routing (or half of it).
    # The trace of a resident generation must equal the transformers path's, step for step.
    from moerun.trace.format import read_trace

    plan = moerun.memory_plan(qwen_bf16, vram_budget=1 << 40, max_context=256)
    model = moerun.load(qwen_bf16, policy="policy p { cache { eviction = lru } }", vram_budget=plan.fixed_bytes +
                        plan.num_slots * plan.slot_bytes, max_context=256, progress=False)
    prompt = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    model.generate(prompt, **kw)  # captures the graphs
    with model.moerun.record_trace(tmp_path / "fast.npz"):
        fast = model.generate(prompt, **kw)
    decode = model.moerun.stats()["decode"]
    assert decode["whole_steps"] == decode["fast_steps"] > 0
    model.moerun.fast_decode = False
    with model.moerun.record_trace(tmp_path / "ref.npz"):
        ref = model.generate(prompt, **kw)
    assert torch.equal(fast, ref)
    got, want = read_trace(tmp_path / "fast.npz"), read_trace(tmp_path / "ref.npz")
    assert got.num_tokens == want.num_tokens == 24 + 31
    assert (got.expert_ids == want.expert_ids).all()
