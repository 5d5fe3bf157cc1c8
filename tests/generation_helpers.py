"""Helpers of the generation tests (tests/runtime): tiny models on the CPU, greedy generations compared
with transformers'."""
import torch

import moerun

NEW_TOKENS = 8


def policy(mode: str, eviction: str = "lru") -> str:
    """A policy text with one eviction kind and one schedule mode."""
    return f"policy p {{ cache {{ eviction = {eviction} }} schedule {{ mode = {mode} }} }}"


def budget_for(path, slots: int, max_batch: int = 1, max_context: int = 64) -> int:
    """The VRAM budget that leaves exactly ``slots`` expert slots (CPU memory plan)."""
    plan = moerun.memory_plan(path, vram_budget=1 << 40, device="cpu", max_context=max_context,
                              max_batch=max_batch)
    return plan.fixed_bytes + slots * plan.slot_bytes


def greedy(model, prompt):
    """(tokens, per-step logits) of a greedy generation of NEW_TOKENS tokens."""
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def assert_matches(got, want):
    """Identical tokens; logits within atol 1e-4 (the fused/CPU-partial sums differ in the last fp32 bits).
    ``got``/``want``: (tokens, logits)."""
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
