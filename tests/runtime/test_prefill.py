"""Chunked prefill and the routing override on transformers' path.

A prompt of more tokens than the memory plan's ``prefill_chunk`` is prefilled as several forwards
over the same KV cache (generate_hooks.forward_in_chunks). Tiny fp32 checkpoints on the CPU. The
cache and logits equal one forward's up to fp32 rounding: a matrix product over a chunk's rows is
not bit-equal to the same rows inside a larger product on CPU BLAS (torch's own nn.Linear differs
by ~5e-7 on a 4-row slice), so the comparison is 1e-5 close and greedy tokens identical.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

import moerun
from moerun.bench.routing_overrides import UniformRouting
from moerun.loader import LoadError
from moerun.models.synthetic import SUPPORTED_ARCHS, build_checkpoint, synthetic_config
from moerun.runtime.moe_layer import install_routing_override

MAX_CONTEXT = 32
NEW_TOKENS = 5
EVICTING = "policy p { cache { eviction = lru } schedule { mode = gpu_only } }"
# Prefill through all three places at once in a 6-slot arena: the cache's free room, 3 staging slots
# (0.5 x 6, the next layer streamed into them), and the CPU for what finds no slot.
STAGING = "policy p { cache { eviction = lru } schedule { mode = gpu_only prefill_staging = 0.5 } }"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: build_checkpoint(synthetic_config(arch), tmp_path_factory.mktemp(arch), seed=3)
            for arch in SUPPORTED_ARCHS}


def _prompt():
    """Batch 2, 13 tokens, the second left-padded by 3."""
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))  # [B, S]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _load(path, prefill_chunk=None, fast_decode=False, slots=None, policy=EVICTING):
    budget = 1 << 40
    if slots is not None:
        plan = moerun.memory_plan(path, vram_budget=budget, device="cpu", max_context=MAX_CONTEXT, max_batch=2,
                                  prefill_chunk=prefill_chunk)
        budget = plan.fixed_bytes + slots * plan.slot_bytes
    return moerun.load(path, policy=policy, vram_budget=budget, device="cpu", max_context=MAX_CONTEXT,
                       max_batch=2, prefill_chunk=prefill_chunk, fast_decode=fast_decode, progress=False)


def _prefill(model, ids, mask):
    """One prefill forward over a fresh cache: (logits [B, S, V], the cache's keys and values)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{model.moerun.decoder.cache_arg: cache})
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return out.logits, kv


def _generate(model, ids, mask):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.fixture(scope="module")
def references(checkpoints):
    """Per architecture, transformers' own fp32 model on the prompt: (prefill logits, greedy tokens, their logits)."""
    ids, mask = _prompt()
    out = {}

    def get(arch):
        if arch not in out:
            model = AutoModelForCausalLM.from_pretrained(checkpoints[arch])
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            out[arch] = (logits, *_generate(model, ids, mask))
        return out[arch]

    return get


def _moe_steps(model) -> int:
    """Layer steps the first MoE layer has run (one per forward through it)."""
    return next(iter(model.moerun.stats()["per_layer"].values()))["steps"]


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_chunked_prefill_equals_one_forward_with_evicting_budget(arch, checkpoints):
    ids, mask = _prompt()
    top_k = synthetic_config(arch).num_experts_per_tok
    whole = _load(checkpoints[arch], slots=top_k)
    chunked = _load(checkpoints[arch], prefill_chunk=8, slots=top_k)   # 4 tokens a sequence: 4 chunks of 13
    assert chunked.moerun.plan.prefill_chunk == 8 and whole.moerun.plan.prefill_chunk == 2 * MAX_CONTEXT
    logits, kv = _prefill(whole, ids, mask)
    steps = _moe_steps(chunked)
    chunked_logits, chunked_kv = _prefill(chunked, ids, mask)
    assert _moe_steps(chunked) - steps == 4
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-5, atol=1e-5)
    assert len(kv) == len(chunked_kv)
    for (k, v), (ck, cv) in zip(kv, chunked_kv):
        torch.testing.assert_close(ck, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cv, v, rtol=1e-5, atol=1e-5)
    tokens, gen_logits = _generate(whole, ids, mask)
    chunked_tokens, chunked_gen_logits = _generate(chunked, ids, mask)
    assert torch.equal(chunked_tokens, tokens)
    torch.testing.assert_close(chunked_gen_logits, gen_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("prefill_chunk", [None, 8])
def test_staged_prefill_equals_transformers(arch, prefill_chunk, checkpoints, references):
    """Batch 2 with left padding, an evicting budget, chunked or not: the prefill's experts split between the
    cache, staging slots (streamed a layer ahead) and the CPU give transformers' logits and greedy tokens."""
    ids, mask = _prompt()
    logits, tokens, gen_logits = references(arch)
    model = _load(checkpoints[arch], prefill_chunk=prefill_chunk, slots=6, policy=STAGING)
    prefill_logits, _ = _prefill(model, ids, mask)
    torch.testing.assert_close(prefill_logits, logits, rtol=1e-4, atol=1e-4)
    engine = model.moerun.stats()["engine"]
    staged = engine["prefill"]
    assert staged["steps"] > 0 and staged["staging_limit"] == 3 and staged["staged_peak"] <= 3
    assert staged["staged"] + staged["streamed"] > 0 and engine["cpu_experts"] > 0, engine
    moerun_tokens, moerun_logits = _generate(model, ids, mask)
    assert torch.equal(moerun_tokens, tokens)
    torch.testing.assert_close(moerun_logits, gen_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_chunked_prefill_on_the_fast_path_matches_transformers(arch, checkpoints):
    ids, mask = _prompt()
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[arch])
    tokens, logits = _generate(reference, ids, mask)
    model = _load(checkpoints[arch], prefill_chunk=6, fast_decode=True)   # 3 a sequence: 5 chunks
    assert model.moerun.fast_decode
    chunked_tokens, chunked_logits = _generate(model, ids, mask)
    assert torch.equal(chunked_tokens, tokens)
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-4, atol=1e-4)
    assert model.moerun.stats()["decode"]["fast_steps"] > 0


def test_logits_to_keep_keeps_the_same_positions(checkpoints):
    ids, mask = _prompt()
    model = _load(checkpoints["qwen2_moe"], prefill_chunk=8)
    for keep in (1, 3, 6):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=keep,
                        **{model.moerun.decoder.cache_arg: DynamicCache(config=model.config)})
        full, _ = _prefill(model, ids, mask)
        assert out.logits.shape[1] == keep
        torch.testing.assert_close(out.logits, full[:, -keep:], rtol=1e-5, atol=1e-5)


def test_a_smaller_prefill_chunk_gives_the_arena_the_workspace_it_saves(checkpoints):
    path = checkpoints["mixtral"]
    auto = moerun.memory_plan(path, vram_budget="1GiB", device="cpu", max_context=4096, max_batch=2)
    small = moerun.memory_plan(path, vram_budget="1GiB", device="cpu", max_context=4096, max_batch=2,
                               prefill_chunk=512)
    assert auto.prefill_chunk == 2 * 4096 and small.prefill_chunk == 512
    assert small.workspace_bytes < auto.workspace_bytes and small.kv_cache_bytes == auto.kv_cache_bytes
    assert small.num_slots >= auto.num_slots


@pytest.mark.parametrize("bad, words", [
    (0, "in 2..64"), (1, "in 2..64"), (65, "in 2..64"), (True, "an int"), ("64", "an int"), (2.5, "an int"),
])
def test_bad_prefill_chunk_is_refused_before_anything_loads(bad, words, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    for call in (moerun.load, moerun.memory_plan):
        with pytest.raises(LoadError, match="prefill_chunk") as info:
            call(missing, device="cpu", max_context=MAX_CONTEXT, max_batch=2, prefill_chunk=bad)
        assert words in str(info.value)


class _Recorder:
    """A routing override that sends every token to experts 0..K-1 and records the tokens it saw."""

    runs_experts = True

    def __init__(self):
        self.tokens: list[int] = []

    def rewrite(self, ids, weights):
        self.tokens.append(ids.shape[0])
        ids.copy_(torch.arange(ids.shape[1]).expand_as(ids))
        weights.fill_(1.0 / ids.shape[1])


def test_one_routing_override_serves_prefill_and_decode(checkpoints):
    ids, mask = _prompt()
    model = _load(checkpoints["mixtral"], fast_decode=True)
    recorder = _Recorder()
    install_routing_override(model, recorder)
    assert model.moerun.decoder.routing_override is recorder
    _generate(model, ids, mask)
    moe_layers = len(model.moerun.stats()["per_layer"])
    assert recorder.tokens[:moe_layers] == [ids.numel()] * moe_layers   # the prefill, on transformers' layers
    assert len(recorder.tokens) > moe_layers                            # and the fast path's steps
    top_k = synthetic_config("mixtral").num_experts_per_tok
    for counts in model.moerun.stats()["per_layer"].values():   # experts 0..K-1 only, in every step
        assert counts["hits"] + counts["fetches"] + counts["cpu_experts"] == top_k * counts["steps"], counts
    install_routing_override(model, None)
    assert model.moerun.decoder.routing_override is None


def test_uniform_routing_reaches_prefill(checkpoints):
    ids, mask = _prompt()
    model = _load(checkpoints["mixtral"])
    install_routing_override(model, UniformRouting(synthetic_config("mixtral").num_local_experts))
    model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    assert all(c["steps"] == 1 for c in model.moerun.stats()["per_layer"].values())
