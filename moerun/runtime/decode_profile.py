"""Per-layer time breakdown of fast-path decode steps, collected only while a profile is open.

Phases of one MoE layer step (docs/design.md, "One MoE layer step"):

- ``graph_a``: device time of the attention segment (norm, attention, norm, router, top-k, copies to host);
- ``sync``: host time blocked waiting for those copies (it overlaps ``graph_a``);
- ``plan``: host time of the policy engine's plan and issuing copies / CPU work (``OffloadRuntime.begin``);
- ``copies_wait``: device time the compute stream waited on slot copies beyond ``plan``
  (device gap from the end of attention to the end of planning's waits, minus ``plan``, floored at zero;
  the shared experts run in that gap, so it is approximate while they take longer than ``plan``);
- ``cpu_wait``: host time blocked on the CPU executor;
- ``graph_b``: device time of the shared experts, the fused MoE (experts segment) and the residual
  segment (CPU partial, shared output, residual);
- ``after``: host time after the experts' launch: slots released, prefetches queued, released
  experts dropped (``OffloadRuntime.after_kernel``) and the step counted (``finish``). The GPU has
  the layer's experts queued meanwhile, so it is on the step's path only where it outlasts them.

The host's own work per MoE layer is ``plan`` + ``after``; ``sync`` is mostly the wait for the GPU
(the attention segment, and whatever the previous layer left queued).

Steps that run as one whole-step graph (every expert resident, or routed experts skipped) have no
layer phases: they count in ``steps``, ``step_ms`` and ``whole_steps`` only.

Device times come from CUDA events (read once per step, when the step ends); on the CPU every
phase is host time. The decoder calls nothing here unless a profile is open, so closed profiles
cost nothing.
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict

import torch

PHASES = ("graph_a", "sync", "plan", "copies_wait", "cpu_wait", "graph_b", "after")


class DecodeProfile:
    """Accumulates phase times per MoE layer (decoder-layer index) over fast-path steps."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.steps = 0
        self.whole_steps = 0  # steps run as one graph: no per-layer phases
        self.step_ms = 0.0  # host wall time of whole steps (embedding to logits)
        self._sum_ms: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
        self._pending: list[tuple[int, str, object, object, float]] = []  # (layer, phase, start, end, minus_ms)
        self._step_start = 0.0

    # -- marks ----------------------------------------------------------------------------------
    def now(self):
        """A time mark on the compute stream (CUDA event) or the host clock (CPU)."""
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def device_span(self, layer: int, phase: str, start, end, minus_ms: float = 0.0) -> None:
        """Add the time between two marks of :meth:`now` (less ``minus_ms``, floored at 0)."""
        self._pending.append((layer, phase, start, end, minus_ms))

    def host_span(self, layer: int, phase: str, start_s: float, until_s: float | None = None) -> float:
        """Add host time from ``start_s`` to ``until_s`` (default now; perf_counter seconds); returns ms."""
        ms = ((time.perf_counter() if until_s is None else until_s) - start_s) * 1e3
        self._sum_ms[layer][phase] += ms
        return ms

    def layer(self, layer: int) -> "LayerTimer":
        """A timer of one planned step of decoder layer ``layer``."""
        return LayerTimer(self, layer)

    def begin_step(self) -> None:
        self._step_start = time.perf_counter()

    def end_step(self, whole: bool = False) -> None:
        self.whole_steps += whole
        if self.on_cuda:
            torch.cuda.synchronize()
        for layer, phase, start, end, minus_ms in self._pending:
            ms = start.elapsed_time(end) if self.on_cuda else (end - start) * 1e3
            self._sum_ms[layer][phase] += max(0.0, ms - minus_ms)
        self._pending.clear()
        self.step_ms += (time.perf_counter() - self._step_start) * 1e3
        self.steps += 1

    # -- report ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        """``{"steps", "whole_steps", "step_ms", "per_layer_ms": {layer: {phase: ms}}, "layer_sum_ms":
        {phase: ms}}``, every time a mean per step (layer phases: per step that has them)."""
        n = max(self.steps - self.whole_steps, 1)
        per_layer = {layer: {p: v / n for p, v in phases.items()} for layer, phases in sorted(self._sum_ms.items())}
        total = {p: sum(phases[p] for phases in per_layer.values()) for p in PHASES}
        return {"steps": self.steps, "whole_steps": self.whole_steps, "step_ms": self.step_ms / max(self.steps, 1),
                "per_layer_ms": per_layer,
                "layer_sum_ms": total}


class LayerTimer:
    """The marks of one planned MoE layer step, turned into its phases (module docstring) by
    :meth:`close`. The step driver marks the device stream between its segments (``mark``) and wraps
    its host waits (``host``); :data:`NO_TIMER` does the same calls for free when no profile is open."""

    def __init__(self, profile: DecodeProfile, layer: int):
        self.profile, self.layer = profile, layer
        self.marks: dict[str, object] = {}
        self.host_ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = self.profile.now()

    @contextlib.contextmanager
    def host(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.host_ms[phase] = self.profile.host_span(self.layer, phase, start)

    def close(self) -> None:
        """Device phases from the marks: attention, then the gap until the plan's waits are queued (less
        the plan's own host time), then the shared experts, the experts and the residual."""
        m, span = self.marks, functools.partial(self.profile.device_span, self.layer)
        span("graph_a", m["attention"], m["attention_end"])
        span("copies_wait", m["attention_end"], m["planned"], minus_ms=self.host_ms.get("plan", 0.0))
        span("graph_b", m["attention_end"], m["shared_end"])
        span("graph_b", m["planned"], m["experts_end"])
        span("graph_b", m["residual"], m["residual_end"])


class _NoTimer:
    _nothing = contextlib.nullcontext()  # reusable: no object made per call on the step's hot path

    def mark(self, name: str) -> None:
        pass

    def host(self, phase: str):
        return self._nothing

    def close(self) -> None:
        pass


NO_TIMER = _NoTimer()
