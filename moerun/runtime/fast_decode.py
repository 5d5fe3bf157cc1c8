"""The fast decode path's step driver: decode steps as CUDA graphs over a static KV cache.

The path has three parts, one module each: where it meets transformers (generate_hooks.py: the
model's forward/generate/mask hooks and what the path can run), what it replays (step_graphs.py:
the static buffers and segments of one step shape), and this driver, which runs a step.

A step runs one of three ways (``FastDecoder._run``), chosen by what can happen in it:

- **whole step** — every expert sits in a slot with its copy landed (``runtime.all_resident()``), so
  no layer needs the host between its router and its experts: the step is one graph, one launch.
  The engine reads each layer's routing one step later, on the host while the next step's graph
  runs (``OffloadRuntime.account``: the same accesses in the same order, so statistics and adapt
  rules see what a planned step shows; ``flush_accounting`` catches up before anything reads them).
  Measured: 207 vs ~120 tok/s resident on the H100 (benchmarks/RESULTS.md, fast decode path).
- **planned** — an expert can miss: per MoE layer, the attention segment, then the layer's one host
  sync, the runtime's plan (copies, CPU experts), then the experts and residual segments
  (:meth:`FastDecoder._moe_layer`). This is ``OffloadRuntime.run``'s sequence of phases with the
  device parts in graphs; the transformers path (prefill, and decode with the fast path off) runs
  ``OffloadRuntime.run`` itself, eagerly.
- **dense only** — a routing override (below) that skips the routed experts: one graph without
  them; a benchmark measures the dense part alone with it.

Lookahead prefetch is issued from two places because the two paths see the next router's input at
different times: here, the ``predict_next`` segment after a layer's residual (its ids are read once
the next layer's attention is queued, so the copies run while it runs); on the transformers path, a
forward hook on the decoder layer (``OffloadedMoE.after_layer``). Both call
``OffloadRuntime.prefetch_ahead`` with the same prediction.

A **routing override** (:class:`RoutingOverride`) is how an experiment changes what the router
chose without touching the product: the benchmarks install one (moerun.bench.routing_overrides:
uniform routing, skipping the routed experts); by default there is none.

This module knows nothing about the policy or the mechanism beyond OffloadRuntime's phases.
"""
from __future__ import annotations

import time
import warnings
import weakref
from typing import Protocol

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.base import MoeAdapter
from ..transformers_contract import TransformersMismatch, check_generate_loop, fast_path_contract
from . import generate_hooks
from .decode_cache import DecodeCache, DecodeMask
from .decode_profile import NO_TIMER, DecodeProfile
from .row_cache import RowCache
from .generate_hooks import unsupported_reason
from .offload import OffloadRuntime
from .segments import Segment, compiled
from .step_graphs import DEVICE_PARTS, MoeSegments, StepBuffers


class RoutingOverride(Protocol):
    """Changes every MoE layer's routing inside fast-path steps (module docstring).

    ``rewrite(ids, weights)`` rewrites the router's ``ids`` ``[T, K]`` int64 and ``weights`` ``[T, K]``
    fp32 in place, with device ops only (it is captured into the step's graphs, so each replay runs it
    anew); ``runs_experts`` False skips the routed experts altogether (their output is zero; no host
    sync, no plan). Tokens are then not the model's.
    """

    runs_experts: bool

    def rewrite(self, ids: torch.Tensor, weights: torch.Tensor) -> None: ...


def _notice(message: str) -> None:
    warnings.warn(f"moerun: {message}", RuntimeWarning, stacklevel=3)


class FastDecoder:
    """Runs decode steps of one loaded model through segments over a static KV cache."""

    def __init__(self, model, adapter: MoeAdapter, runtime: OffloadRuntime, *, max_context: int,
                 max_batch: int, device: torch.device, dtype: torch.dtype, compile_backend: str | None = None):
        self.model = weakref.ref(model)  # the model holds the decoder (through its handle)
        self.adapter = adapter
        self.runtime = runtime
        self.device, self.dtype = device, dtype
        try:  # the KV-cache argument name of this transformers (None: the fast path cannot run)
            self.cache_arg: str | None = fast_path_contract(model)
        except TransformersMismatch:
            self.cache_arg = None  # unsupported_reason() says why when the fast path is switched on
        # moerun's generate() loop (decode_loop.py): used unless switched off or this transformers lacks
        # what it calls (loop_off_reason says which); generations it ran, and steps it ran past a stop.
        self.own_loop = True
        self.loop_off_reason: str | None = None
        try:
            check_generate_loop(model)
        except TransformersMismatch as exc:
            self.loop_off_reason = str(exc)
        self.loop_generations = 0
        self.loop_extra_steps = 0
        self.cache = DecodeCache(model.config, max_context, max_batch)
        self.mask = DecodeMask(self.cache, self.cache_arg)
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._compile_backend = compile_backend
        self._device_fns: dict[str, object] = {}
        self.enabled = False
        self.off_reason: str | None = "not switched on"  # why decode steps do not take the fast path
        self.fallback_steps = 0  # decode steps over moerun's cache that ran through transformers anyway
        self._routing_override: RoutingOverride | None = None
        self.profile: DecodeProfile | None = None
        self.fast_steps = 0
        self.whole_steps = 0  # fast steps run as one graph (no expert could miss)
        self._pending: tuple[StepBuffers, int] | None = None  # a whole step whose routing the engine has not read
        self._shapes: dict[tuple[int, int, int], StepBuffers] = {}
        self._notified: set[str] = set()

    @property
    def compile_backend(self) -> str | None:
        """torch.compile backend of the segments' device parts ("inductor", or "eager" to trace only),
        or None (no compiling). Setting it rebuilds the segments at the next step."""
        return self._compile_backend

    @compile_backend.setter
    def compile_backend(self, backend: str | None) -> None:
        if backend != self._compile_backend:
            self._compile_backend = backend
            self._device_fns.clear()
            self._drop_graphs()

    def _drop_graphs(self) -> None:
        """Forget every step shape's buffers and segments, and start a new graph memory pool: once the
        old graphs are gone their pool is released, and torch refuses to capture into a released pool
        (an internal assert in the caching allocator, seen when a benchmark swapped routing overrides)."""
        self._shapes.clear()
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()

    def device_fn(self, kind: str):
        """The device part of one kind of segment (``step_graphs.DEVICE_PARTS``), compiled once for
        every layer and step shape when the decoder compiles."""
        fn = self._device_fns.get(kind)
        if fn is None:
            fn = DEVICE_PARTS[kind]
            if self.compile_backend:
                fn = compiled(fn, self.compile_backend)
            self._device_fns[kind] = fn
        return fn

    @property
    def routing_override(self) -> RoutingOverride | None:
        """The installed :class:`RoutingOverride` (None: the model's own routing). Setting it rebuilds
        the segments at the next step (their graphs hold the routing they were captured with)."""
        return self._routing_override

    @routing_override.setter
    def routing_override(self, override: RoutingOverride | None) -> None:
        if override is not self._routing_override:
            self.flush_accounting()
            self._routing_override = override
            self._drop_graphs()

    # -- switch ---------------------------------------------------------------------------------
    def install(self, model) -> None:
        """Route the model's decode steps and generate() through this decoder (generate_hooks)."""
        generate_hooks.install(self, model)

    def set_enabled(self, enabled: bool) -> bool:
        """Turn the fast path on or off; on is refused (with a one-line notice) where unsupported."""
        reason = None if enabled else "switched off (fast_decode=False)"
        if enabled:
            reason = unsupported_reason(self.model())
            if reason is not None:
                _notice(f"fast decode path off for this model: {reason}; decoding runs through transformers' layers")
                enabled = False
        self.enabled, self.off_reason = enabled, reason
        return enabled

    def notice_once(self, key: str, message: str) -> None:
        if key not in self._notified:
            self._notified.add(key)
            _notice(message)

    def stats(self) -> dict:
        """Fast-path steps (and how many ran as one whole-step graph), graphs captured and replayed,
        segments run eagerly, why the path is off or which steps it could not take, and the
        generations moerun's generate loop ran (``loop_extra_steps``: steps it ran past a stop it read
        one step late; ``loop_off_reason``: why the loop is not used, None when it is)."""
        segs = [s for buf in self._shapes.values() for s in buf.segments()]
        return {"enabled": self.enabled, "off_reason": self.off_reason, "fast_steps": self.fast_steps,
                "fallback_steps": self.fallback_steps, "whole_steps": self.whole_steps,
                "graphs": sum(s.graph is not None for s in segs),
                "graph_replays": sum(s.replays for s in segs),
                "eager_segment_calls": sum(s.calls - s.replays for s in segs),
                "kv_cache_bytes": self.cache.nbytes(), "loop_generations": self.loop_generations,
                "loop_extra_steps": self.loop_extra_steps,
                "loop_off_reason": self.loop_off_reason or (None if self.own_loop else "switched off")}

    def start_generation(self, batch_size: int):
        """The static cache, emptied, for a generation of ``batch_size`` sequences."""
        cache, replaced = self.cache.start(batch_size)
        self.mask.reset()
        if replaced:
            self._drop_graphs()  # their segments were built over the previous cache
        return cache

    def start_rows(self):
        """The static cache as rows of independent sequences (decode_cache.DecodeCache.start_rows), for
        the serving engine, which calls :meth:`step` with per-row ``position_ids`` and 4-D masks."""
        cache, replaced = self.cache.start_rows(self.device)
        self.mask.reset()
        if replaced:
            self._drop_graphs()  # their segments were built over the previous cache
        return cache

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, *, input_ids: torch.Tensor, attention_mask=None, position_ids=None,
             logits_to_keep: int = 0, **flags) -> CausalLMOutputWithPast:
        """One decode step of ``input_ids`` ``[B, Q]`` (already counted in the cache length); the KV
        cache comes under its transformers name (``self.cache_arg``) among ``flags``."""
        cache = flags[self.cache_arg]
        batch, tokens = input_ids.shape
        start = self.cache.length - tokens  # positions written before this step
        if position_ids is None:
            position_ids = torch.arange(start, start + tokens, device=input_ids.device).expand(batch, tokens)
        def query_positions():  # [B, Q] the cache positions this step writes (rows: each its own)
            offsets = torch.arange(tokens, device=input_ids.device)
            if isinstance(cache, RowCache):
                return cache.write_positions[:batch, None] + offsets
            return (start + offsets).expand(batch, tokens)

        masks = generate_hooks.step_masks(self, input_ids, attention_mask, cache, position_ids, query_positions)
        keep = min(logits_to_keep, tokens) if logits_to_keep > 0 else tokens  # 0 keeps every position
        buf = self._shapes.get((batch, tokens, keep))
        if buf is None or any(buf.masks[k].shape != m.shape or buf.masks[k].dtype != m.dtype
                              for k, m in masks.items()):
            buf = self._shapes[(batch, tokens, keep)] = StepBuffers(self, batch, tokens, keep, masks)
        buf.input_ids.copy_(input_ids)
        buf.position_ids.copy_(position_ids)
        for kind, mask in masks.items():
            buf.masks[kind].copy_(mask)
        self._run(buf)
        self.fast_steps += 1
        return CausalLMOutputWithPast(logits=buf.logits.clone(), **{self.cache_arg: cache})

    def _run(self, buf: StepBuffers) -> None:
        """The step, one of the three ways of the module docstring."""
        prof = self.profile
        if prof:
            prof.begin_step()
        override = self._routing_override
        whole = True
        if override is not None and not override.runs_experts:  # dense only
            self.flush_accounting()
            buf.whole["skip_routed"][0]()  # the routed output stays the zeros it was built with
        elif self.runtime.all_resident():  # whole step; the engine reads its routing one step later
            hosts, buf.parity = buf.parity, buf.parity ^ 1
            buf.whole["resident"][hosts]()
            if buf.done[hosts] is not None:
                buf.done[hosts].record(torch.cuda.current_stream(self.device))
            self.flush_accounting()
            self._pending = (buf, hosts)
        else:  # planned
            self.flush_accounting()
            self._run_planned(buf)
            whole = False
        self.whole_steps += whole
        if prof:
            prof.end_step(whole)

    def flush_accounting(self) -> None:
        """Let the engine read the routing of the last whole step, if not yet read (the handle calls
        this before statistics, policy swaps and traces are read, and generate() at its end)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        buf, hosts = pending
        if buf.done[hosts] is not None:
            buf.done[hosts].synchronize()
        for entry in buf.layers:
            if isinstance(entry, MoeSegments):
                host = entry.hosts[hosts]
                host.started_at = time.perf_counter()
                self.runtime.account(entry.block.moe_index, host)

    def _run_planned(self, buf: StepBuffers) -> None:
        """A step with one host sync per MoE layer: the engine plans each layer between its router and
        its experts; a lookahead prediction made after one layer is prefetched during the next."""
        buf.head()
        predicted_for = None  # the MoE layer whose experts the last predict_next predicted
        for entry in buf.layers:
            if isinstance(entry, Segment):
                entry()  # a dense decoder layer
            else:
                predicted_for = self._moe_layer(buf, entry, predicted_for)
        buf.tail()

    def _moe_layer(self, buf: StepBuffers, seg: MoeSegments, predicted_for: int | None) -> int | None:
        """One MoE decoder layer of a planned step; returns the MoE layer its lookahead predicted for."""
        runtime, block = self.runtime, seg.block
        timer = self.profile.layer(block.layer) if self.profile else NO_TIMER
        started = time.perf_counter()
        timer.mark("attention")
        seg.attention()
        timer.mark("attention_end")
        self._record(buf.copied)
        if predicted_for is not None:  # lookahead: the previous layer predicted this one; copy while attention runs
            self._wait(buf.predicted)
            runtime.prefetch_ahead(predicted_for, buf.pred_host)
        if seg.shared is not None:
            seg.shared()  # the GPU runs the shared experts while the host waits and plans
        timer.mark("shared_end")
        with timer.host("sync"):
            self._wait(buf.copied)  # the layer's one host sync: the router's output is in the pinned buffers
        with timer.host("plan"):
            host = seg.hosts[0]
            host.started_at = started
            step = runtime.begin(block.moe_index, host)
        timer.mark("planned")
        seg.experts()
        timer.mark("experts_end")
        with timer.host("after"):
            runtime.after_kernel(step)
        if step.cpu_experts:
            with timer.host("cpu_wait"):
                runtime.wait_cpu(step)
        timer.mark("residual")
        (seg.residual_cpu if step.cpu_experts else seg.residual)()
        predicted = None
        if runtime.lookahead and seg.predict_next is not None:
            seg.predict_next()
            self._record(buf.predicted)
            predicted = block.next_moe_index
        timer.mark("residual_end")
        timer.close()
        with timer.host("after"):
            runtime.finish(step)
        return predicted

    def _record(self, event) -> None:
        if event is not None:
            event.record(torch.cuda.current_stream(self.device))

    @staticmethod
    def _wait(event) -> None:
        if event is not None:
            event.synchronize()
