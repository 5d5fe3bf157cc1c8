"""Generation through moerun is token-identical to plain transformers on the same checkpoint.

Tiny fp32 checkpoints on the CPU; the arena lives in host memory and the experts in slots run in the
native host kernel (moerun.native.fused_moe_host). Where a step runs experts on the CPU executor, the sum of the routed experts is
accumulated in a different order than transformers' (fused kernel for resident experts + CPU
partial), so logits may differ in the last fp32 bits: those tests also compare logits with
atol 1e-4 and still require identical greedy tokens (the synthetic models' top-2 logit margins are
far above that). The second half runs the same checks through the fast decode path.
"""
import functools
from importlib import resources

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import moerun
from moerun.models.synthetic import SUPPORTED_ARCHS, build_checkpoint, synthetic_config
from moerun.runtime.decode_cache import ContextOverflowError
from moerun.runtime.decode_profile import PHASES
from moerun.runtime.generate_hooks import BatchOverflowError

from generation_helpers import NEW_TOKENS, assert_matches as _assert_matches, budget_for as _budget_for  # noqa: E402
from generation_helpers import CollectStreamer, check_decode_masks, greedy as _generate, policy as _policy  # noqa: E402

LRU_AUTO = "policy tight { cache { eviction = lru } }"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    built = {}
    for arch in SUPPORTED_ARCHS:
        built[arch] = build_checkpoint(synthetic_config(arch), tmp_path_factory.mktemp(arch), seed=3)
    return built


@pytest.fixture(scope="module")
def references(checkpoints):
    """Plain transformers greedy tokens and last-step logits per architecture."""
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    refs = {}
    for arch, path in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        refs[arch] = (prompt, out.sequences, torch.stack(out.logits))
    return refs


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_greedy_matches_transformers_with_every_step_evicting(arch, checkpoints, references):
    # The smallest arena that works (top_k slots): every step evicts, every miss is a copy.
    top_k = synthetic_config(arch).num_experts_per_tok
    model = moerun.load(checkpoints[arch], policy=_policy("gpu_only"), device="cpu", max_context=64,
                        vram_budget=_budget_for(checkpoints[arch], top_k), progress=False)
    assert model.moerun.memory()["device"]["num_slots"] == top_k
    prompt, ref_tokens, ref_logits = references[arch]
    tokens, logits = _generate(model, prompt)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    stats = model.moerun.stats()
    for layer, counts in stats["per_layer"].items():
        assert counts["evictions"] >= counts["steps"] - 1, (layer, counts)


@pytest.mark.parametrize("mode", ["gpu_only", "cpu_fallback", "hybrid"])
def test_every_schedule_mode_matches(mode, checkpoints, references):
    arch = "qwen2_moe"
    model = moerun.load(checkpoints[arch], policy=_policy(mode), device="cpu", max_context=64,
                        vram_budget=_budget_for(checkpoints[arch], 4), progress=False)
    prompt, ref_tokens, ref_logits = references[arch]
    tokens, logits = _generate(model, prompt)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    stats = model.moerun.stats()
    if mode == "cpu_fallback":
        assert stats["cpu_experts"] > 0
    if mode == "gpu_only":
        assert stats["cpu_experts"] == 0 or stats["engine"].get("overflow", 0) > 0


def _bundled_policies():
    return sorted(p.name for p in resources.files("moerun.policies").iterdir() if p.name.endswith(".moe"))


def test_policies_are_bundled():
    assert "balanced.moe" in _bundled_policies()


@pytest.mark.parametrize("policy", _bundled_policies())
def test_every_bundled_policy_matches(policy, checkpoints, references):
    # The budget fits every expert: the all-resident path, under each policy's engine settings.
    arch = "mixtral"
    model = moerun.load(checkpoints[arch], policy=policy, device="cpu", max_context=64, progress=False)
    prompt, ref_tokens, ref_logits = references[arch]
    tokens, logits = _generate(model, prompt)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_batch_with_left_padding_matches(checkpoints):
    path = checkpoints["qwen3_moe"]
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left-padded second row
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = AutoModelForCausalLM.from_pretrained(path).generate(ids, **kw)
    model = moerun.load(path, policy=LRU_AUTO, device="cpu", max_context=64, max_batch=2,
                        vram_budget=_budget_for(path, 3, max_batch=2), progress=False)
    assert torch.equal(model.generate(ids, **kw), ref)


def test_sampling_and_streamer(checkpoints):
    path = checkpoints["mixtral"]
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(path).generate(prompt, **kw)
    model = moerun.load(path, policy=LRU_AUTO, device="cpu", max_context=64, progress=False)
    streamer = CollectStreamer()
    torch.manual_seed(0)
    out = model.generate(prompt, streamer=streamer, **kw)
    assert torch.equal(out, ref)
    assert streamer.chunks[0] == prompt[0].tolist() and streamer.chunks[-1] == "end"
    assert [c[0] for c in streamer.chunks[1:-1]] == out[0, 4:].tolist()


class _SwapEvery(LogitsProcessor):
    """Swaps the model's policy between decode steps, cycling through ``policies``."""

    def __init__(self, model, policies, every):
        self.model, self.policies, self.every, self.calls = model, policies, every, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls % self.every == 0:
            self.model.moerun.set_policy(self.policies[(self.calls // self.every) % len(self.policies)])
        return scores


def test_hot_swap_during_generation_loses_nothing(checkpoints, references):
    arch = "olmoe"
    path = checkpoints[arch]
    model = moerun.load(path, policy=_policy("gpu_only"), device="cpu", max_context=64,
                        vram_budget=_budget_for(path, 5), progress=False)
    swapper = _SwapEvery(model, [_policy("gpu_only", "lfu"), _policy("cpu_fallback"), _policy("hybrid")], 2)
    prompt, ref_tokens, _ = references[arch]
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                         logits_processor=LogitsProcessorList([swapper]))
    assert swapper.calls == NEW_TOKENS
    assert torch.equal(out, ref_tokens)


def test_lookahead_prefetch_feeds_predictions_and_matches(checkpoints, references):
    from moerun.policy.ir import CacheConfig, CompiledPolicy, PrefetchConfig

    arch = "deepseek_v2"
    policy = CompiledPolicy(name="ahead", cache=CacheConfig(eviction="lru"),
                            prefetch=PrefetchConfig(strategy="lookahead", budget=2))
    path = checkpoints[arch]
    model = moerun.load(path, policy=policy, device="cpu", max_context=64,
                        vram_budget=_budget_for(path, 6), progress=False)
    assert model.moerun.runtime.lookahead
    prompt, ref_tokens, _ = references[arch]
    tokens, _ = _generate(model, prompt)
    assert torch.equal(tokens, ref_tokens)
    assert model.moerun.stats()["prefetches"] > 0


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_lookahead_predicts_with_the_next_router_on_the_residual_after_each_layer(arch, checkpoints, references,
                                                                                  record_prefetch_ahead):
    # Once decoder layer l is done, MoE layer l+1's experts are predicted by its router on its
    # post-attention norm of the residual stream layer l produced (transformers' hidden state).
    from moerun.models import adapter_for

    path = checkpoints[arch]
    ref = AutoModelForCausalLM.from_pretrained(path)
    adapter = adapter_for(ref.config)
    layers = adapter.moe_layers()
    out = {}

    def keep(module, args, output, l):
        h = output[0] if isinstance(output, tuple) else output  # [B, S, H]
        out[l] = h.reshape(-1, h.shape[-1])
    for l in layers:
        ref.model.layers[l].register_forward_hook(functools.partial(keep, l=l))
    prompt = references[arch][0]
    with torch.no_grad():
        ref(prompt)
    policy = "policy p { cache { eviction = lru } prefetch { strategy = lookahead budget = 2 } }"
    model = moerun.load(path, policy=policy, device="cpu", max_context=64, vram_budget=_budget_for(path, 6),
                        progress=False)
    calls = record_prefetch_ahead(model)
    with torch.no_grad():
        model(prompt)
    assert [layer for layer, _ in calls] == list(range(1, len(layers)))  # MoE indices 1..L-1, in order
    for (moe_index, got), l, nxt in zip(calls, layers, layers[1:]):
        next_layer = ref.model.layers[nxt]
        gate = getattr(ref.get_submodule(adapter.block_path(nxt)), adapter.router_attr)
        with torch.no_grad():
            want = adapter.route(gate, next_layer.post_attention_layernorm(out[l]))[0]  # [T, K]
        assert torch.equal(got, want), (arch, moe_index)
    assert model.moerun.stats()["engine"]["routing_prediction_accuracy"] is not None


def test_record_trace_writes_what_the_router_chose(checkpoints, references, tmp_path):
    from moerun.models import adapter_for
    from moerun.trace.format import read_trace

    arch = "qwen2_moe"
    path = checkpoints[arch]
    ref_model = AutoModelForCausalLM.from_pretrained(path)
    adapter = adapter_for(ref_model.config)
    seen = {layer: [] for layer in adapter.moe_layers()}
    for layer in seen:
        gate = ref_model.get_submodule(adapter.block_path(layer)).gate
        gate.register_forward_hook(lambda m, i, out, layer=layer: seen[layer].append(out[2]))
    prompt = references[arch][0]
    ref_model.generate(prompt, max_new_tokens=4, do_sample=False)
    expected = torch.stack([torch.cat(seen[layer]) for layer in sorted(seen)], dim=1)  # [N, L, K]

    model = moerun.load(path, policy=LRU_AUTO, device="cpu", max_context=64, progress=False)
    with model.moerun.record_trace(tmp_path / "run.npz"):
        model.generate(prompt, max_new_tokens=4, do_sample=False)
    trace = read_trace(tmp_path / "run.npz")
    assert trace.expert_ids.shape == tuple(expected.shape)
    assert torch.equal(torch.from_numpy(trace.expert_ids).long().sort(-1).values, expected.sort(-1).values)
    assert trace.step_starts.tolist() == [0, 6, 7, 8, 9] and trace.prompt_starts.tolist() == [0]
    assert trace.num_experts == 8 and trace.expert_bytes == model.moerun.plan.slot_bytes
    assert model.moerun.runtime.recorder is None


ADAPT = """policy flip {
    cache { eviction = lru }
    schedule { mode = hybrid }
    adapt {
        when hit_rate < 0.99 for 16 accesses { eviction = lfu }
        when hit_rate < 0.98 for 24 accesses { eviction = lru }
    }
}"""


@pytest.mark.parametrize("new_tokens", [
    48,
    pytest.param(1000, marks=pytest.mark.gpu),  # minutes in the CPU interpreter: run where kernels are fast
])
def test_adapt_rules_that_fire_change_no_token(checkpoints, new_tokens):
    # Plain transformers is the run "without adapt rules" (the engine cannot change its math).
    path = checkpoints["mixtral"]
    device = "cuda" if new_tokens > 100 else "cpu"
    prompt = torch.tensor([[5, 9, 17, 33]], device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    ref = AutoModelForCausalLM.from_pretrained(path).to(device).generate(prompt, **kw)
    model = moerun.load(path, policy=ADAPT, device=device, max_context=new_tokens + 16,
                        vram_budget=_budget_for(path, 5, max_context=new_tokens + 16), progress=False)
    out = model.generate(prompt, **kw)
    assert model.moerun.stats()["engine"]["adapt_firing_count"] >= 3
    assert torch.equal(out, ref)


# -- the fast decode path -----------------------------------------------------------------------------
# On the CPU its segments run eagerly (no graph capture), so everything else of the fast path runs here:
# the static KV cache, the forward/generate hooks, the segment code, the runtime's phases. The static
# cache's attention reduces over max_context positions rather than the filled ones, so logits may differ
# from the references in the last fp32 bits (atol 1e-4 as above); tokens must be identical.
def _load_fast(path, slots=None, **kw):
    budget = _budget_for(path, slots, max_batch=kw.get("max_batch", 1)) if slots else "auto"
    return moerun.load(path, device="cpu", max_context=64, vram_budget=budget, fast_decode=True,
                       progress=False, **kw)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_whole_steps_hand_the_engine_every_layers_own_routing(arch, checkpoints, tmp_path):
    # A whole step's routing is read after the step, every MoE layer's from its own host buffers: the
    # trace the engine's accounting writes equals the transformers path's, step for step and layer by layer.
    from moerun.trace.format import read_trace

    path = checkpoints[arch]
    model = _load_fast(path, policy=LRU_AUTO)
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with model.moerun.record_trace(tmp_path / "fast.npz"):
        fast = model.generate(prompt, **kw)
    decode = model.moerun.stats()["decode"]
    assert decode["whole_steps"] == decode["fast_steps"] == NEW_TOKENS - 1
    model.moerun.fast_decode = False
    with model.moerun.record_trace(tmp_path / "ref.npz"):
        ref = model.generate(prompt, **kw)
    assert torch.equal(fast, ref)
    got, want = read_trace(tmp_path / "fast.npz"), read_trace(tmp_path / "ref.npz")
    assert got.num_tokens == want.num_tokens == 6 + NEW_TOKENS - 1
    assert (got.expert_ids == want.expert_ids).all()
    np.testing.assert_allclose(got.gate_weights, want.gate_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", ["evict_every_step", "resident"])
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_fast_path_matches_transformers_path_and_plain_transformers(arch, budget, checkpoints, references):
    path = checkpoints[arch]
    prompt, ref_tokens, ref_logits = references[arch]
    top_k = synthetic_config(arch).num_experts_per_tok
    model = _load_fast(path, top_k if budget == "evict_every_step" else None, policy=_policy("gpu_only"))
    fast = _generate(model, prompt)
    decode = model.moerun.stats()["decode"]
    assert decode["fast_steps"] == NEW_TOKENS - 1  # every step after the prefill
    assert decode["kv_cache_bytes"] == model.moerun.plan.kv_cache_bytes  # the planned reserve, exactly
    _assert_matches(fast, (ref_tokens, ref_logits))

    model.moerun.fast_decode = False
    _assert_matches(_generate(model, prompt), fast)
    assert model.moerun.stats()["decode"]["fast_steps"] == NEW_TOKENS - 1  # the switch took effect
    if budget == "evict_every_step":
        assert decode["whole_steps"] == 0  # every step needs the host's plan between A and B
        for counts in model.moerun.stats()["per_layer"].values():
            assert counts["evictions"] >= counts["steps"] - 1
    else:
        # Every expert was copied in at load, so no step can miss: each decode step ran as one graph
        # and the engine still saw every layer of every step (prefill and decode, both paths).
        assert decode["whole_steps"] == NEW_TOKENS - 1
        stats = model.moerun.stats()
        assert stats["misses"] == 0 and stats["hits"] > 0
        for counts in stats["per_layer"].values():
            assert counts["steps"] == 2 * NEW_TOKENS


def test_cpu_experts_and_lookahead_through_the_fast_path(checkpoints, references, record_prefetch_ahead):
    # Hybrid scheduling with lookahead prefetch: the CPU-partial segment and the predicted ids run.
    path = checkpoints["qwen2_moe"]
    prompt = references["qwen2_moe"][0]
    policy = ("policy p { cache { eviction = lru } prefetch { strategy = lookahead budget = 2 } "
              "schedule { mode = cpu_fallback } }")
    model = _load_fast(path, 4, policy=policy)
    calls = record_prefetch_ahead(model)
    fast = _generate(model, prompt)
    stats = model.moerun.stats()
    assert stats["cpu_experts"] > 0 and stats["prefetches"] > 0 and stats["decode"]["fast_steps"] > 0
    fast_calls, calls[:] = list(calls), []
    model.moerun.fast_decode = False
    _assert_matches(_generate(model, prompt), fast)
    # the fast path's P segments predict what the transformers path's layer hooks do, step by step
    assert len(fast_calls) == len(calls) > 0
    for (layer_f, ids_f), (layer_t, ids_t) in zip(fast_calls, calls):
        assert layer_f == layer_t and torch.equal(ids_f, ids_t)


def test_sampling_and_streamer_match_the_transformers_path(checkpoints):
    path = checkpoints["mixtral"]
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9)
    model = _load_fast(path, policy=LRU_AUTO)
    streamer = CollectStreamer()
    torch.manual_seed(0)
    fast = model.generate(prompt, streamer=streamer, **kw)
    assert model.moerun.stats()["decode"]["fast_steps"] == 5
    model.moerun.fast_decode = False
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, **kw), fast)
    assert streamer.chunks[0] == prompt[0].tolist() and streamer.chunks[-1] == "end"
    assert [c[0] for c in streamer.chunks[1:-1]] == fast[0, 4:].tolist()


def test_left_padded_batch_matches_and_larger_batches_are_refused_before_any_work(checkpoints):
    path = checkpoints["qwen3_moe"]
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left-padded second row
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    ref = AutoModelForCausalLM.from_pretrained(path).generate(ids[:2], attention_mask=mask[:2], **kw)
    model = _load_fast(path, 3, policy=LRU_AUTO, max_batch=2)
    with torch.inference_mode():  # the cache made here is reused outside inference mode below
        assert torch.equal(model.generate(ids[:2], attention_mask=mask[:2], **kw), ref)
    assert torch.equal(model.generate(ids[:2], attention_mask=mask[:2], **kw), ref)
    assert model.moerun.stats()["decode"]["fast_steps"] == 2 * (NEW_TOKENS - 1)
    steps = model.moerun.stats()["steps"]
    # More sequences than max_batch (the KV cache and activations the budget reserved) on either path:
    # refused before the prefill, naming max_batch and the one that would do.
    for fast in (True, False):
        model.moerun.fast_decode = fast
        with pytest.raises(BatchOverflowError, match=r"\(3 prompts\) would run 3 sequences at once, but the model "
                                                     r"was loaded with max_batch=2.*max_batch=3"):
            model.generate(ids, attention_mask=mask, **kw)
        with pytest.raises(BatchOverflowError, match=r"2 prompts x 2 return sequences.*4 sequences.*max_batch=4"):
            model.generate(ids[:2], attention_mask=mask[:2], num_return_sequences=2, do_sample=True,
                           max_new_tokens=NEW_TOKENS)
        with pytest.raises(BatchOverflowError, match=r"1 prompts x 3 return sequences or beams each"):
            model.generate(ids[:1], num_beams=3, max_new_tokens=NEW_TOKENS)
        with pytest.raises(BatchOverflowError, match="this forward would run 3 sequences"):
            model(ids)
    assert model.moerun.stats()["steps"] == steps  # nothing ran
    assert torch.equal(model.generate(ids[:2], attention_mask=mask[:2], **kw), ref)  # the model still works


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean mask, an additive one
def test_decode_mask_extended_on_the_device_equals_transformers_own(checkpoints, attention):
    # generate() asks for a fresh 4-D static-cache mask before every step; the fast path extends the
    # last one by the new column instead. Every step's mask must be the one transformers would build.
    path = checkpoints["qwen3_moe"]
    model = _load_fast(path, policy=LRU_AUTO, max_batch=2)
    model.set_attn_implementation(attention)
    extended = check_decode_masks(model.moerun.decoder)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left-padded second row
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    padded = model.generate(ids, attention_mask=mask, **kw)
    unpadded = model.generate(ids[:1, 2:], **kw)  # no 2-D mask at all
    assert sum(extended) == 2 * (NEW_TOKENS - 2)  # all decode steps but each generation's first
    model.moerun.fast_decode = False
    assert torch.equal(model.generate(ids, attention_mask=mask, **kw), padded)
    assert torch.equal(model.generate(ids[:1, 2:], **kw), unpadded)


def test_generation_past_max_context_is_a_clear_error_before_the_prefill(checkpoints):
    path = checkpoints["olmoe"]
    model = moerun.load(path, device="cpu", max_context=10, fast_decode=True, progress=False)
    prompt = torch.tensor([[5, 9, 17, 33, 4, 8]])
    # 6 + 8 new tokens write 13 KV positions (the last token is never fed back): refused before any forward.
    with pytest.raises(ContextOverflowError, match=r"up to 13 tokens per sequence \(a prompt of 6 \+ "
                                                   r"max_new_tokens=8.*max_context=10.*moerun.load\(\.\.\., "
                                                   r"max_context=N\).*Nothing was run"):
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with pytest.raises(ContextOverflowError, match=r"max_length=12 .*max_context=10"):
        model.generate(prompt, max_length=12, do_sample=False)
    model.moerun.fast_decode = False
    with pytest.raises(ContextOverflowError, match="max_context=10"):
        model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert model.moerun.stats()["steps"] == 0
    # Within the limit (6 + 5 tokens, the last one never fed back) the same model generates.
    model.moerun.fast_decode = True
    out = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ref = AutoModelForCausalLM.from_pretrained(path).generate(prompt, max_new_tokens=5, min_new_tokens=5,
                                                               do_sample=False)
    assert torch.equal(out, ref)


def test_a_length_from_the_models_generation_config_is_not_refused_up_front(checkpoints):
    # Checkpoints' generation configs often name lengths far beyond a loaded max_context; a call that asks
    # for none runs, ends by end of sequence, and would still stop at the step past max_context.
    path = checkpoints["olmoe"]
    prompt = torch.tensor([[5, 9, 17, 33, 4, 8]])
    reference = AutoModelForCausalLM.from_pretrained(path)
    eos = int(reference.generate(prompt, max_new_tokens=3, do_sample=False)[0, -1])  # ends it within 3 tokens
    ref = reference.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=eos)
    for fast in (True, False):
        model = moerun.load(path, device="cpu", max_context=10, fast_decode=fast, progress=False)
        model.generation_config.max_length = 1000
        model.generation_config.eos_token_id = eos
        assert torch.equal(model.generate(prompt, do_sample=False), ref), fast
        with pytest.raises(ContextOverflowError, match="max_context=10"):
            model.generation_config.eos_token_id = None
            model.generate(prompt, do_sample=False)  # runs until the step that would not fit


def test_a_trace_keeps_the_steps_recorded_before_its_body_raised(checkpoints, tmp_path):
    from moerun.trace.format import read_trace

    model = moerun.load(checkpoints["olmoe"], device="cpu", max_context=16, progress=False)
    prompt = torch.tensor([[5, 9, 17, 33, 4]])
    with pytest.raises(ContextOverflowError):
        with model.moerun.record_trace(tmp_path / "t.npz"):
            for _ in range(3):
                model.generate(prompt, max_new_tokens=3, do_sample=False)  # a prefill and 2 decode steps each
            model.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=20)
    trace = read_trace(tmp_path / "t.npz")
    assert len(trace.step_starts) - 1 == 9 and trace.prompt_starts.tolist() == [0, 7, 14]
    with pytest.raises(KeyError):  # a body that fails before any step completes leaves no file
        with model.moerun.record_trace(tmp_path / "none.npz"):
            raise KeyError("x")
    assert not (tmp_path / "none.npz").exists()


def test_unsupported_layer_falls_back_with_a_notice(checkpoints, references):
    path = checkpoints["deepseek_v2"]
    prompt, ref_tokens, _ = references["deepseek_v2"]
    model = _load_fast(path, policy=LRU_AUTO)
    model.model.layers[1].extra_norm = nn.Identity()  # a layout the segments do not reproduce
    model.moerun.fast_decode = False
    with pytest.warns(RuntimeWarning, match="fast decode path off for this model: decoder layer 1"):
        model.moerun.fast_decode = True
    assert not model.moerun.fast_decode
    tokens, _ = _generate(model, prompt)
    assert model.moerun.stats()["decode"]["fast_steps"] == 0
    assert torch.equal(tokens, ref_tokens)


def test_a_transformers_without_the_internals_turns_the_fast_path_off_with_its_reason(checkpoints, references,
                                                                                   monkeypatch):
    import transformers

    from moerun import transformers_contract

    path = checkpoints["qwen2_moe"]
    prompt, ref_tokens, _ = references["qwen2_moe"]
    # As if transformers had renamed the KV-cache argument again.
    monkeypatch.setattr(transformers_contract, "CACHE_ARGUMENT_NAMES", ("kv_state",))
    with pytest.warns(RuntimeWarning, match=rf"fast decode path off.*transformers {transformers.__version__} passes "
                                            r"the KV cache under argument names moerun does not know"):
        model = _load_fast(path, policy=LRU_AUTO)
    decode = model.moerun.stats()["decode"]
    assert not decode["enabled"] and "moerun supports transformers" in decode["off_reason"]
    assert torch.equal(_generate(model, prompt)[0], ref_tokens)
    assert model.moerun.stats()["decode"]["fast_steps"] == 0


def test_decode_steps_the_fast_path_cannot_take_are_counted_with_a_notice(checkpoints, references):
    path = checkpoints["olmoe"]
    prompt, ref_tokens, _ = references["olmoe"]
    model = _load_fast(path, policy=LRU_AUTO)
    with pytest.warns(RuntimeWarning, match="decode steps run through transformers' layers: attentions, hidden "
                                            "states or router logits were asked for"):
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_hidden_states=True,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref_tokens)
    decode = model.moerun.stats()["decode"]
    assert decode["enabled"] and decode["off_reason"] is None
    assert decode["fast_steps"] == 0 and decode["fallback_steps"] == NEW_TOKENS - 1


def test_a_generate_whose_cache_never_reaches_forward_says_so(checkpoints, references, monkeypatch):
    path = checkpoints["olmoe"]
    prompt, ref_tokens, _ = references["olmoe"]
    model = _load_fast(path, policy=LRU_AUTO)
    # As if transformers' generate() passed the cache on under another name: forward never sees moerun's.
    monkeypatch.setattr(model.moerun.decoder.cache, "owns", lambda cache: False)
    with pytest.warns(RuntimeWarning, match="fast decode path not used: transformers .* did not pass the KV cache"):
        tokens, _ = _generate(model, prompt)
    assert torch.equal(tokens, ref_tokens)
    decode = model.moerun.stats()["decode"]
    assert decode["fast_steps"] == 0 and "did not pass the KV cache" in decode["off_reason"]


def test_hot_policy_swap_mid_generation_with_the_fast_path(checkpoints, references):
    path = checkpoints["olmoe"]
    prompt, ref, _ = references["olmoe"]
    model = _load_fast(path, 5, policy=_policy("gpu_only"))
    swapper = _SwapEvery(model, [_policy("gpu_only", "lfu"), _policy("cpu_fallback"), _policy("hybrid")], 2)
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                         logits_processor=LogitsProcessorList([swapper]))
    assert swapper.calls == NEW_TOKENS
    assert torch.equal(out, ref)
    assert model.moerun.stats()["decode"]["fast_steps"] == NEW_TOKENS - 1


def test_profile_breaks_down_every_moe_layer(checkpoints, references):
    path = checkpoints["deepseek_v3"]
    prompt = references["deepseek_v3"][0]
    model = _load_fast(path, synthetic_config("deepseek_v3").num_experts_per_tok + 2, policy=LRU_AUTO)
    with model.moerun.profile_decode() as profile:
        model.generate(prompt, max_new_tokens=4, do_sample=False)
    summary = profile.summary()
    assert summary["steps"] == 3 and summary["whole_steps"] == 0
    assert sorted(summary["per_layer_ms"]) == model.moerun.moe_layers
    for phases in summary["per_layer_ms"].values():
        assert set(phases) == set(PHASES) and phases["graph_a"] > 0 and phases["graph_b"] > 0
    assert model.moerun.decoder.profile is None

    resident = _load_fast(path, policy=LRU_AUTO)  # every step one graph: step times, no layer phases
    with resident.moerun.profile_decode() as profile:
        resident.generate(prompt, max_new_tokens=4, do_sample=False)
    summary = profile.summary()
    assert summary["steps"] == summary["whole_steps"] == 3 and summary["step_ms"] > 0
    assert summary["per_layer_ms"] == {}


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_compiled_segments_trace_every_layer_and_match(arch, checkpoints, references):
    # torch.compile's "eager" backend runs the same tracing (Dynamo) as inductor without generating
    # kernels, so CI checks that every segment of a shared-expert model and an MLA model with dense
    # layers traces and gives the same tokens; inductor itself runs in the gpu tests.
    path = checkpoints[arch]
    prompt, ref_tokens, ref_logits = references[arch]
    for slots in (None, synthetic_config(arch).num_experts_per_tok):  # whole-step graph, then per layer
        model = _load_fast(path, slots, policy=_policy("gpu_only"))
        model.moerun.decoder.compile_backend = "eager"
        _assert_matches(_generate(model, prompt), (ref_tokens, ref_logits))
        assert model.moerun.stats()["decode"]["whole_steps"] == (NEW_TOKENS - 1 if slots is None else 0)


def test_reset_stats_starts_the_counters_from_zero(checkpoints, references):
    prompt = references["qwen2_moe"][0]
    model = _load_fast(checkpoints["qwen2_moe"], 4, policy=_policy("gpu_only"))
    _generate(model, prompt)
    assert model.moerun.stats()["fetches"] > 0
    engine_accesses = model.moerun.stats()["engine"]["accesses"]
    model.moerun.reset_stats()
    stats = model.moerun.stats()
    assert stats["fetches"] == stats["hits"] == stats["steps"] == 0
    assert stats["engine"]["accesses"] == engine_accesses  # the engine's own statistics keep counting


def test_arena_is_filled_at_load_only_when_the_policy_keeps_every_expert(checkpoints, references):
    path = checkpoints["qwen2_moe"]
    prompt = references["qwen2_moe"][0]
    full = _load_fast(path, policy=_policy("gpu_only"))  # room for every expert: filled at load
    arena = full.moerun.runtime.arena
    assert arena.resident_count == arena.num_layers * arena.num_experts
    capped = _load_fast(path, policy="policy p { cache { capacity = 4  eviction = lru } }")
    assert capped.moerun.runtime.arena.resident_count == 0  # which 4 to keep is the policy's call
    _generate(capped, prompt)
    stats = capped.moerun.stats()
    assert stats["fetches"] > 0 and stats["decode"]["whole_steps"] == 0


def test_uniform_routing_override_draws_distinct_experts_for_the_engine(checkpoints, references, tmp_path):
    # The benchmark's override replaces every router's choice on the device, so the engine, the trace and
    # the kernels see it: K distinct experts per token, spread over all experts, weights 1/K.
    from moerun.bench.routing_overrides import UniformRouting
    from moerun.trace.format import read_trace

    path = checkpoints["qwen2_moe"]
    prompt = references["qwen2_moe"][0]
    model = _load_fast(path, 4, policy=_policy("gpu_only"))
    model.moerun.decoder.routing_override = UniformRouting(synthetic_config("qwen2_moe").num_experts)
    with model.moerun.record_trace(tmp_path / "uniform.npz"):
        model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    trace = read_trace(tmp_path / "uniform.npz")
    decode = trace.expert_ids[trace.step_starts[1]:]  # [steps, L, K]: the fast path's steps
    k = decode.shape[-1]
    assert decode.shape[0] == 15 and all(len(set(row)) == k for row in decode.reshape(-1, k).tolist())
    assert len(set(decode.reshape(-1).tolist())) == synthetic_config("qwen2_moe").num_experts
    assert (trace.gate_weights[trace.step_starts[1]:] == 1.0 / k).all()


def test_skipping_the_routed_experts_runs_whole_dense_steps_the_engine_never_sees(checkpoints, references):
    from moerun.bench.routing_overrides import SkipRoutedExperts

    path = checkpoints["olmoe"]
    prompt = references["olmoe"][0]
    model = _load_fast(path, 4, policy=_policy("gpu_only"))
    model.moerun.decoder.routing_override = SkipRoutedExperts()
    model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    stats = model.moerun.stats()
    assert stats["decode"]["fast_steps"] == stats["decode"]["whole_steps"] == NEW_TOKENS - 1
    for counts in stats["per_layer"].values():
        assert counts["steps"] == 1  # the prefill only: decode steps never reached the engine
    model.moerun.decoder.routing_override = None  # the model's own routing again, same tokens as transformers
    tokens, _ = _generate(model, prompt)
    assert torch.equal(tokens, references["olmoe"][1])


def test_a_generation_under_inference_mode_leaves_buffers_later_steps_can_write(checkpoints):
    # The runtime's reusable host buffers grow inside whatever mode the step runs in; grown under
    # torch.inference_mode() they must still take the next step's writes outside it.
    model = moerun.load(checkpoints["qwen2_moe"], device="cpu", max_context=64, progress=False, fast_decode=False)
    prompt = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        first = model.generate(prompt, max_new_tokens=4, do_sample=False)
    model.moerun.fast_decode = True
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), first)
