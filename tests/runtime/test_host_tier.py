"""Generation with the host pool as a cache in front of the files (host_budget below the experts):
token-identical to transformers while experts are read from disk every step."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import moerun
from moerun.models.synthetic import build_checkpoint, synthetic_config
from moerun.runtime.memory import BudgetError

ARCH = "qwen2_moe"
NEW_TOKENS = 6
POLICY = "policy p { cache { eviction = lru } }"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(synthetic_config(ARCH), tmp_path_factory.mktemp(ARCH), seed=5)


@pytest.fixture(scope="module")
def reference(ckpt):
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return prompt, out.sequences, torch.stack(out.logits)


def _plan(ckpt):
    return moerun.memory_plan(ckpt, vram_budget=1 << 40, device="cpu", max_context=64)


@pytest.mark.parametrize("mode,prefetch", [("gpu_only", "none"), ("cpu_fallback", "none"), ("gpu_only", "affinity")])
def test_greedy_matches_transformers_with_the_host_cache_reading_from_disk(ckpt, reference, mode, prefetch):
    top_k = synthetic_config(ARCH).num_experts_per_tok
    plan = _plan(ckpt)
    # The host cache holds one layer's top-k and the arena two (room for prefetches): both tiers miss
    # every step.
    # Prefetches read their host misses on the pool's I/O threads and copy once the bytes are there.
    policy = (f"policy p {{ cache {{ eviction = lru }} prefetch {{ strategy = {prefetch}  budget = 2 }} "
              f"schedule {{ mode = {mode} }} }}")
    model = moerun.load(ckpt, policy=policy, device="cpu",
                        max_context=64, vram_budget=plan.fixed_bytes + 2 * top_k * plan.slot_bytes,
                        host_budget=top_k * plan.slot_bytes + 1, progress=False)
    host_mem = model.moerun.memory()["host"]
    assert host_mem["capacity"] == top_k and host_mem["experts"] == 2 * 8
    assert host_mem["pool"] == top_k * plan.slot_bytes
    prompt, ref_tokens, ref_logits = reference
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref_tokens)
    torch.testing.assert_close(torch.stack(out.logits), ref_logits, rtol=1e-4, atol=1e-4)
    host = model.moerun.stats()["host"]
    assert host["misses"] >= NEW_TOKENS and host["disk_bytes"] > 0 and host["evictions"] > 0
    if mode == "cpu_fallback":
        assert model.moerun.stats()["cpu_experts"] > 0
    if prefetch != "none":
        assert model.moerun.stats()["engine"]["prefetches"] > 0


def test_policy_host_capacity_and_host_budget_the_smaller_wins(ckpt):
    plan = _plan(ckpt)
    policy = "policy p { cache { eviction = lru } host { capacity = 5  eviction = lfu } }"
    mem = moerun.load(ckpt, policy=policy, device="cpu", max_context=64, progress=False).moerun.memory()
    assert mem["host"]["capacity"] == 5
    mem = moerun.load(ckpt, policy=policy, device="cpu", max_context=64, host_budget=3 * plan.slot_bytes,
                      progress=False).moerun.memory()
    assert mem["host"]["capacity"] == 3
    # and the other way: the policy's capacity below what the budget would hold
    policy = "policy p { cache { eviction = lru } host { capacity = 3  eviction = lfu } }"
    mem = moerun.load(ckpt, policy=policy, device="cpu", max_context=64, host_budget=5 * plan.slot_bytes,
                      progress=False).moerun.memory()
    assert mem["host"]["capacity"] == 3


def test_host_budget_below_one_layer_step_names_the_smallest_that_works(ckpt):
    plan = _plan(ckpt)
    top_k = synthetic_config(ARCH).num_experts_per_tok
    with pytest.raises(BudgetError, match=rf"holds 1 experts.*top_k = {top_k}.*smallest host budget that works "
                                          rf"is {top_k * plan.slot_bytes} bytes"):
        moerun.load(ckpt, policy=POLICY, device="cpu", max_context=64, host_budget=plan.slot_bytes, progress=False)
    with pytest.raises(BudgetError, match="policy's host capacity 1"):
        moerun.load(ckpt, policy="policy p { cache { eviction = lru } host { capacity = 1 } }", device="cpu", max_context=64,
                    progress=False)
    with pytest.raises(ValueError, match="host_budget"):
        moerun.load(ckpt, policy=POLICY, device="cpu", max_context=64, host_budget="lots", progress=False)


def test_set_policy_refuses_another_host_tier_and_keeps_the_old_policy(ckpt):
    loaded = "policy p { cache { eviction = lru } host { capacity = 8  eviction = lru } }"
    model = moerun.load(ckpt, policy=loaded, device="cpu", max_context=64, progress=False)
    with pytest.raises(ValueError, match=r"host \{ capacity = 4 .* differs from the host tier this model was "
                                         r"loaded with, host \{ capacity = 8 .*load the model again"):
        model.moerun.set_policy("policy q { cache { eviction = lru } host { capacity = 4 } }")
    with pytest.raises(ValueError, match="eviction = lfu"):
        model.moerun.set_policy("policy q { cache { eviction = lru } host { capacity = 8  eviction = lfu } }")
    assert model.moerun.policy.name == "p" and model.moerun.runtime.engine.setup.policy_name == "p"
    assert model.moerun.memory()["host"]["capacity"] == 8
    # The loaded tier is accepted; a policy without a host block keeps it.
    model.moerun.set_policy("policy same { cache { eviction = lru } host { capacity = 8 } }")
    model.moerun.set_policy("policy none { cache { eviction = lfu } }")
    assert model.moerun.policy.name == "none"
    model.moerun.set_policy("policy again { cache { eviction = lru } host { capacity = 8 } }")
