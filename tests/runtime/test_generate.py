"""Generation through moerun is token-identical to plain transformers on the same checkpoint.

Tiny fp32 checkpoints on the CPU; the arena lives in host memory and the Triton kernels run in the
interpreter. Where a step runs experts on the CPU executor, the sum of the routed experts is
accumulated in a different order than transformers' (fused kernel for resident experts + CPU
partial), so logits may differ in the last fp32 bits: those tests also compare logits with
atol 1e-4 and still require identical greedy tokens (the synthetic models' top-2 logit margins are
far above that).
"""
from importlib import resources

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import moerun
from moerun.models.synthetic import SUPPORTED_ARCHS, build_checkpoint, synthetic_config

NEW_TOKENS = 12
LRU_AUTO = "policy tight { cache { eviction = lru } }"


def _policy(mode: str, eviction: str = "lru") -> str:
    return f"policy p {{ cache {{ eviction = {eviction} }} schedule {{ mode = {mode} }} }}"


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


def _budget_for(path, slots: int, max_batch: int = 1) -> int:
    plan = moerun.memory_plan(path, vram_budget=1 << 40, device="cpu", max_context=64, max_batch=max_batch)
    return plan.fixed_bytes + slots * plan.slot_bytes


def _generate(model, prompt):
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_greedy_matches_transformers(arch, checkpoints, references):
    model = moerun.load(checkpoints[arch], policy=LRU_AUTO, device="cpu", progress=False)
    prompt, ref_tokens, ref_logits = references[arch]
    tokens, logits = _generate(model, prompt)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_budget_so_small_every_step_evicts(arch, checkpoints, references):
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
    arch = "deepseek_v3"
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


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")


def test_sampling_and_streamer(checkpoints):
    path = checkpoints["mixtral"]
    prompt = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(path).generate(prompt, **kw)
    model = moerun.load(path, policy=LRU_AUTO, device="cpu", max_context=64, progress=False)
    streamer = _Collect()
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
