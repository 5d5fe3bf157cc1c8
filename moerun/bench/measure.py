"""Timing one loaded system: prefill, time to first token and decode speed over repeats.

Each repeat generates ``new_tokens`` tokens for one batch of prompts, greedily or, when a
sampling seed is given, by sampling the full distribution with that seed (every system draws the
same random numbers). Greedy decoding of a random-weight model soon repeats itself, which keeps
the same experts busy; sampling gives the near-uniform routing that is the hard case for a cache. A streamer stamps
the time each step's tokens reach the host (the step is complete then), so time to first token
and decode time come from one generation. Expert counters are read at the start of a repeat, at
its first token and at its end, so prefill and decode traffic are reported apart, and warm-up and
loading traffic not at all. This module knows nothing about how a system is
built or how results are shown.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.generation.streamers import BaseStreamer

from moerun.bench.counters import ExpertCounters
from moerun.bench.systems import LoadedSystem


class _TokenClock(BaseStreamer):
    """A transformers streamer that records when each step's tokens arrive on the host, and calls
    ``on_first_token`` once the first generated token is there (after its time stamp)."""

    def __init__(self, on_first_token: Callable[[], None] | None = None):
        super().__init__()
        self.stamps_s: list[float] = []
        self.on_first_token = on_first_token

    def put(self, value) -> None:   # first call: the prompt; then one call per generated step
        self.stamps_s.append(time.perf_counter())
        if len(self.stamps_s) == 2 and self.on_first_token is not None:
            self.on_first_token()

    def end(self) -> None:
        pass


@dataclass
class RepeatTiming:
    """One timed generation of a batch."""

    ttft_s: float                  # prompt in -> first generated token on the host
    decode_s: float                # first generated token -> last one
    decode_steps: int              # generated steps after the first
    tokens: list[list[int]]        # generated token ids per sequence


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, input_ids: torch.Tensor, new_tokens: int, streamer=None,
              sample_seed: int | None = None) -> torch.Tensor:
    sampling = {}
    if sample_seed is not None:
        torch.manual_seed(sample_seed)  # seeds the CPU and every CUDA device
        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    return model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, streamer=streamer, **({"do_sample": False} | sampling),
    )


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device,
                   on_first_token: Callable[[], None] | None = None,
                   sample_seed: int | None = None) -> RepeatTiming:
    """Generates ``new_tokens`` tokens after ``input_ids`` [B, S] and times the phases.

    Greedy, or sampled with ``sample_seed``. ``on_first_token`` runs when the first generated token
    reaches the host (not when the model's ``generate`` does not drive a streamer).
    """
    clock = _TokenClock(on_first_token)
    _sync(device)
    start_s = time.perf_counter()
    with torch.inference_mode():
        output = _generate(model, input_ids, new_tokens, streamer=clock, sample_seed=sample_seed)
    _sync(device)
    end_s = time.perf_counter()
    generated = output[:, input_ids.shape[1]:]                                   # [B, new_tokens]
    steps = generated.shape[1]
    if len(clock.stamps_s) >= steps + 1:
        first_token_s = clock.stamps_s[1]
    else:
        # The model's generate did not drive the streamer: time the first token on its own.
        _sync(device)
        first_start_s = time.perf_counter()
        with torch.inference_mode():
            _generate(model, input_ids, 1, sample_seed=sample_seed)
        _sync(device)
        first_token_s = start_s + (time.perf_counter() - first_start_s)
    return RepeatTiming(
        ttft_s=first_token_s - start_s,
        decode_s=max(end_s - first_token_s, 0.0),
        decode_steps=max(steps - 1, 0),
        tokens=generated.tolist(),
    )


@dataclass
class Spread:
    """Median and range of one metric over repeats."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread | None":
        return cls(statistics.median(values), min(values), max(values)) if values else None


@dataclass
class Measurement:
    """What one system did over the timed repeats."""

    decode_tok_s: Spread | None          # generated tokens per second after the first, batch included
    prefill_tok_s: Spread | None         # prompt tokens per second of the first step, batch included
    ttft_ms: Spread | None
    prefill_counters: ExpertCounters     # the prompts' forward passes
    decode_counters: ExpertCounters      # the steps after the first token
    gpu_peak_bytes: int | None           # None without a GPU
    repeats_run: int
    tokens: list[list[list[int]]] = field(default_factory=list)   # [repeat][sequence][token]


def measure(
    system: LoadedSystem,
    prompts: list[torch.Tensor],
    warmup_prompt: torch.Tensor,
    new_tokens: int,
    device: torch.device,
    time_limit_s: float,
    progress=None,
    sample_seed: int | None = None,
) -> Measurement:
    """Warm up once on ``warmup_prompt``, then time one generation per entry of ``prompts``.

    Stops early (after at least one repeat) once the timed repeats have taken ``time_limit_s``.
    ``progress`` (a tqdm bar or None) is advanced once per repeat. With ``sample_seed``, repeat
    ``i`` samples with seed ``sample_seed + i`` (greedy otherwise).
    """
    model = system.model
    # Enough steps that moerun's fast path has compiled and captured all its graphs (up to 6 steps).
    timed_generate(model, warmup_prompt.to(device), min(new_tokens, 8), device)
    prefill, decode = ExpertCounters(), ExpertCounters()
    timings: list[RepeatTiming] = []
    spent_s = 0.0
    for index, prompt in enumerate(prompts):
        start = system.counters()
        first: list[ExpertCounters] = []
        timing = timed_generate(model, prompt.to(device), new_tokens, device,
                                on_first_token=lambda: first.append(system.counters()),
                                sample_seed=None if sample_seed is None else sample_seed + index)
        end = system.counters()
        mid = first[0] if first else start     # no streamer: everything is counted as decode
        prefill, decode = prefill + (mid - start), decode + (end - mid)
        timings.append(timing)
        spent_s += timing.ttft_s + timing.decode_s
        if progress is not None:
            progress.update(1)
        if spent_s >= time_limit_s:
            break
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    batch, prompt_len = prompts[0].shape
    return Measurement(
        decode_tok_s=Spread.of([batch * t.decode_steps / t.decode_s for t in timings if t.decode_s > 0]),
        prefill_tok_s=Spread.of([batch * prompt_len / t.ttft_s for t in timings if t.ttft_s > 0]),
        ttft_ms=Spread.of([1e3 * t.ttft_s for t in timings]),
        prefill_counters=prefill,
        decode_counters=decode,
        gpu_peak_bytes=peak,
        repeats_run=len(timings),
        tokens=[t.tokens for t in timings],
    )


def token_match(tokens: list[list[list[int]]], reference: list[list[list[int]]]) -> tuple[int, int]:
    """(matching tokens, compared tokens): per sequence, the length of the prefix equal to the reference.

    Decoding diverges for good after the first differing token, so the prefix is the honest count
    (with sampling, the same seed draws the same numbers, so equal logits give equal tokens).
    """
    matched = compared = 0
    for repeat, ref_repeat in zip(tokens, reference):
        for seq, ref_seq in zip(repeat, ref_repeat):
            prefix = 0
            for a, b in zip(seq, ref_seq):
                if a != b:
                    break
                prefix += 1
            matched += prefix
            compared += min(len(seq), len(ref_seq))
    return matched, compared


def dense_step_ms(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Milliseconds of one decode step of a moerun model with its routed experts skipped (the fast
    path's ``SkipRoutedExperts`` override): the dense part's floor under any expert placement; 0.0
    (not measured) where the model decodes without the fast path (a CPU run under the model's routing).
    The model's routing override is restored."""
    from moerun.bench.routing_overrides import SkipRoutedExperts
    from moerun.runtime.moe_layer import install_routing_override

    handle = model.moerun
    if not handle.fast_decode:
        return 0.0
    override = handle.decoder.routing_override
    install_routing_override(model, SkipRoutedExperts())
    try:
        timed_generate(model, prompt, min(new_tokens, 8), device)   # captures the skipping step's graphs
        timing = timed_generate(model, prompt, new_tokens, device)
    finally:
        install_routing_override(model, override)
    return 1e3 * timing.decode_s / timing.decode_steps if timing.decode_steps else 0.0


@dataclass
class PrefillPoint:
    """Time to first token at one prompt length (one generated token per repeat: the prefill forward)."""

    prompt_len: int
    ttft_ms: Spread | None
    prefill_tok_s: Spread | None    # prompt tokens per second, batch included
    counters: ExpertCounters        # the prompts' forward passes
    bound: object = None            # moerun rows: limits.PrefillBound at this length
    reference_ttft_ms: float | None = None   # hf-resident's median TTFT at this length, where it ran


def measure_prefill(system: LoadedSystem, prompts: list[torch.Tensor], device: torch.device,
                    time_limit_s: float) -> PrefillPoint:
    """Warm up on the first of ``prompts`` [B, S], then time one single-token generation per prompt."""
    model = system.model
    timed_generate(model, prompts[0].to(device), 1, device)
    counters, timings, spent_s = ExpertCounters(), [], 0.0
    for prompt in prompts:
        start = system.counters()
        timing = timed_generate(model, prompt.to(device), 1, device)
        counters = counters + (system.counters() - start)
        timings.append(timing)
        spent_s += timing.ttft_s
        if spent_s >= time_limit_s:
            break
    batch, prompt_len = prompts[0].shape
    return PrefillPoint(prompt_len, Spread.of([1e3 * t.ttft_s for t in timings]),
                        Spread.of([batch * prompt_len / t.ttft_s for t in timings if t.ttft_s > 0]), counters)
