"""Budget strings and the split of a device budget into skeleton, KV, workspace and slots."""
import pytest
import torch

import moerun
from moerun.models import adapter_for
from moerun.models.synthetic import build_checkpoint, synthetic_config
from moerun.runtime.memory import (WORKSPACE_BASE_BYTES, BudgetError, _activation_bytes_per_token, decode_graph_bytes,
                                   parse_bytes, plan_memory, slot_elems)


@pytest.mark.parametrize("text,expected", [("10GiB", 10 * 2**30), ("512 MB", 512 * 10**6), ("1.5gb", 1_500_000_000),
                                           (4096, 4096), ("2KiB", 2048), (8192.0, 8192),
                                           ("4.35KB", 4350)])  # exact decimals: 4.35 * 1000 is 4349.99... in floats
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["ten gigs", "10 GX", -5, 0, True, "-1GB", "0.5", "1.9B", 1.5, "0.3KiB"])
def test_parse_bytes_rejects_nonsense(bad):
    with pytest.raises(BudgetError, match="budget"):
        parse_bytes(bad)


def test_slot_layout_is_padded_to_64_elements():
    adapter = adapter_for(synthetic_config("mixtral", hidden_size=40, intermediate_size=10))
    assert slot_elems(adapter) == 1216  # 3*10*40 = 1200 -> 1216


def test_plan_fills_the_budget_with_slots_and_reports_the_smallest_budget():
    adapter = adapter_for(synthetic_config("qwen2_moe"))
    kw = dict(skeleton_bytes=10_000, dtype=torch.float32, max_context=64, max_batch=1, max_slots=16)
    probe = plan_memory(adapter, budget_bytes=1 << 40, **kw)
    assert probe.num_slots == 16  # capped at the number of routed experts
    plan = plan_memory(adapter, budget_bytes=probe.fixed_bytes + 5 * probe.slot_bytes + 7, **kw)
    assert plan.num_slots == 5
    assert plan.fixed_bytes + plan.arena_bytes <= plan.budget_bytes
    with pytest.raises(BudgetError, match=f"smallest budget that works is .*\\({probe.min_budget_bytes} bytes\\)"):
        plan_memory(adapter, budget_bytes=probe.min_budget_bytes - 1, **kw)
    assert plan_memory(adapter, budget_bytes=probe.min_budget_bytes, **kw).num_slots == adapter.top_k


def test_the_workspace_holds_the_activations_of_each_prefill_token(tmp_path):
    """Below 1024 tokens, each token of prefill_chunk adds one token's activations to the workspace, on top
    of the fixed scratch (the base and one fp32 logits row); the decode graphs' part does not depend on it."""
    config = synthetic_config("qwen3_moe")
    path = build_checkpoint(config, tmp_path / "ckpt", seed=0)
    adapter, itemsize, max_context = adapter_for(config), torch.float32.itemsize, 1024
    per_token = _activation_bytes_per_token(adapter, itemsize)
    decode = decode_graph_bytes(adapter, itemsize, 1, max_context)
    for chunk in (1, 2, 600, 1023):
        plan = moerun.memory_plan(path, device="cpu", dtype=torch.float32, max_context=max_context,
                                  prefill_chunk=chunk)
        fixed = WORKSPACE_BASE_BYTES + 4 * config.vocab_size + decode
        assert plan.workspace_bytes - fixed == chunk * per_token, chunk
