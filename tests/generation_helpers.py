"""Helpers of the generation tests (tests/runtime): tiny models on the CPU, greedy generations compared
with transformers'."""
import torch
from transformers.generation.streamers import BaseStreamer

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


def greedy(model, prompt, *, every_step: bool = False, **kw):
    """(tokens, per-step logits) of a greedy generation of NEW_TOKENS tokens; ``every_step`` holds off the
    end of sequence (min_new_tokens), so that every step runs whatever weights a seed drew."""
    if every_step:
        kw["min_new_tokens"] = NEW_TOKENS
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits)


def assert_matches(got, want):
    """Identical tokens; logits within atol 1e-4 (the fused/CPU-partial sums differ in the last fp32 bits).
    ``got``/``want``: (tokens, logits)."""
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


def check_decode_masks(decoder, kinds: set[str] | None = None) -> list[bool]:
    """Wrap ``decoder.mask.build`` so that every mask it hands generate() is checked against the one
    transformers builds (per attention kind; ``kinds``: the kinds expected, when given). Returns a list that
    gains, per call, whether the call extended the last step's mask on the device."""
    build, extended = decoder.mask.build, []

    def as_dict(masks):
        return dict(masks) if isinstance(masks, dict) else {"full_attention": masks}

    def checked(original, *args, **kwargs):
        was = decoder.mask._columns
        out = build(original, *args, **kwargs)
        got, want = as_dict(out), as_dict(original(*args, **kwargs))
        assert set(got) == set(want) and (kinds is None or set(want) == kinds), (set(got), set(want))
        for kind, mask in want.items():
            assert (got[kind] is None) == (mask is None), kind
            if mask is not None:
                assert got[kind].dtype == mask.dtype and torch.equal(got[kind], mask.expand_as(got[kind])), kind
        extended.append(decoder.mask._columns == was + 1 and was > 0)
        return out

    decoder.mask.build = checked
    return extended


class CollectStreamer(BaseStreamer):
    """A streamer that keeps what generate() hands it: each value as a list of ids, then ``"end"``."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")
