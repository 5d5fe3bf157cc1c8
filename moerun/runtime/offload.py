"""The per-layer expert step: ids to the host (the one sync), plan, copies, CPU experts, fused MoE.

``OffloadRuntime`` owns what the MoE layers of one model share: the slot arena, the host pool,
the transfer engine, the CPU executor and the policy engine. ``run(moe_layer, x, ids, weights)``
carries out one MoE layer's step as docs/design.md draws it (``moe_layer`` counts MoE layers only: it is the
engine's, the arena's and the pool's layer id, so dense layers cost no slots):

1. the chosen ids and gate weights go to pinned host buffers; waiting on that copy is the step's
   only host sync;
2. the native policy engine plans: hits, fetches (slot + victim), CPU experts, prefetches;
3. the transfer engine copies fetched and prefetched experts pool -> slot on its copy streams
   (a copy into a slot waits until the last kernel reading the slot is done); it takes the plan
   whole, in one call before the kernel and one after, and writes the device slot table once each;
4. the CPU executor starts the CPU experts' tokens on host threads;
5. the compute stream waits on exactly the slots it reads, the fused kernel runs over the slots
   (pairs not resident contribute zero), and the slots' release events are recorded;
6. the CPU partial sum is added.

``run`` is these phases in order (``to_host``, ``begin``, ``moe_kernel``, ``after_kernel``,
``wait_cpu`` + :func:`merge_cpu_partial`, ``finish``); the fast decode path (fast_decode.py) calls
the same phases, with the device-side ones inside its CUDA graphs.

This module decides nothing: the engine decides, the mechanism moves bytes. It knows nothing
about transformers modules (see moe_layer.py). A decode step runs these phases once per MoE layer
with the GPU waiting on the host between router and experts, so the host side of a phase is a few
native calls, and the plan's lists stay native (the runtime reads its counts).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..expert_predictor import load_predictor, step_top
from .layer_counters import LayerCounters
from .trace_recorder import TraceRecorder


class _PinnedBuffer:
    """A reusable host buffer for device -> host copies, grown when a step needs more room."""

    def __init__(self, dtype: torch.dtype, pin: bool):
        self.dtype, self.pin = dtype, pin
        self.buf = torch.empty(0, dtype=dtype, pin_memory=pin)

    def take(self, numel: int) -> torch.Tensor:
        if self.buf.numel() < numel:
            # Never an inference tensor, even when a step under torch.inference_mode() grows it: the next
            # step may run outside that mode and write into it.
            with torch.inference_mode(False):
                self.buf = torch.empty(max(numel, 2 * self.buf.numel()), dtype=self.dtype, pin_memory=self.pin)
        return self.buf[:numel]


@dataclass
class HostStep:
    """Host-side inputs of one layer step: pinned copies of the router's output and the tokens.

    The transformers path fills them per call (:meth:`OffloadRuntime.to_host`); the fast decode
    path owns static ones that its captured graphs copy into.
    """

    x: torch.Tensor               # [T, H] tokens (the CPU experts' input)
    ids: torch.Tensor             # [T, K] int64 routed experts
    weights: torch.Tensor         # [T, K] fp32 gate weights
    cpu_out: torch.Tensor         # [T, H] fp32 the CPU executor's partial sum
    started_at: float = 0.0       # perf_counter() when the step began (for the cost model)
    prefill: bool = False         # a prefill's step (more than one new token per sequence): docs/design.md, Prefill
    _routing: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def routing(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [T*K], weights [T*K])``: numpy views of the pinned buffers, which the engine reads
        in place. Made on first use: the fast path's buffers are static, so a step makes none."""
        if self._routing is None:
            self._routing = (self.ids.view(-1).numpy(), self.weights.view(-1).numpy())
        return self._routing


@dataclass(slots=True)
class StepPlan:
    """One layer step's plan as the runtime carries it out, and how far it got, so that a step an
    exception or Ctrl-C cut short can be completed (settle())."""

    moe_layer: int
    start: float
    plan: object                  # the engine's Plan; it is rewritten by the next plan the engine makes
    num_pairs: int                # T*K routed pairs
    counts: tuple[int, ...]       # Plan.counts: (hits, fetches, fetch evictions, cpu, cpu pairs, prefetches, ...)
    cpu_experts: list[int]        # run on the CPU executor
    cpu_pairs: int                # routed pairs of those
    inputs: HostStep | None = None  # what the CPU job reads: kept alive until it is waited for
    cpu_us: float = 0.0
    handed: bool = False          # the transfer engine has the plan (begin_step ran)
    cpu_submitted: bool = False
    cpu_waited: bool = False
    kernel_done: bool = False     # after_kernel ran: slots released, prefetches issued, releases applied


class OffloadRuntime:
    """Shared state of one offloaded model and the step each of its MoE layers runs."""

    def __init__(
        self,
        *,
        engine,
        arena,
        pool,
        transfer,
        cpu_executor,
        layout,
        num_layers: int,
        num_experts: int,
        slot_bytes: int,
        device: torch.device,
        lookahead: bool,
        observe_timings: bool,
        predictor=None,
        activation=None,
    ):
        self.engine = engine
        self.arena = arena
        self.pool = pool
        self.transfer = transfer
        self.cpu_executor = cpu_executor
        self.layout = layout  # the SlotLayout of every slot (moerun.native.slot_layout): format, shape, offsets
        self.activation = activation  # the adapter's ExpertActivation (None: silu); every kernel and the CPU executor take it
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.slot_bytes = slot_bytes
        self.device = device
        self.lookahead = lookahead
        self.predictor = predictor  # ExpertPredictor of `learned` prefetch, or None
        self._step_ids: list[torch.Tensor | None] = [None] * num_layers  # this step's ids per MoE layer
        self.counters = [LayerCounters() for _ in range(num_layers)]
        self.recorder: TraceRecorder | None = None
        # The fused MoE over the slots: Triton's kernels on a GPU; on a CPU device (the arena is then
        # host memory) the native one, since Triton could only interpret its kernels there.
        if device.type == "cuda":
            self._fused_moe = importlib.import_module("moerun.kernels.fused_moe").fused_moe
        else:
            from ..native import fused_moe_host

            self._fused_moe = fused_moe_host
        on_cuda = device.type == "cuda"
        self._ids_host = _PinnedBuffer(torch.int64, on_cuda)
        self._weights_host = _PinnedBuffer(torch.float32, on_cuda)
        self._pred_host = _PinnedBuffer(torch.int64, on_cuda)  # lookahead ids (transformers path)
        self._x_host: dict[torch.dtype, _PinnedBuffer] = {}
        self._cpu_out_buf = _PinnedBuffer(torch.float32, on_cuda)
        self.observe_timings = observe_timings
        self._total_experts = num_layers * num_experts
        self._open: StepPlan | None = None  # the step between begin() and finish()

    # -- the step -------------------------------------------------------------------------------
    def run(
        self,
        moe_layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        prefill: bool = False,
    ) -> torch.Tensor:
        """Routed-expert output ``[T, H]`` (x.dtype) of MoE layer ``moe_layer`` for tokens ``x`` ``[T, H]``.

        ``ids`` ``[T, K]`` and ``weights`` ``[T, K]`` (fp32) are the router's choice on x's device.
        ``prefill``: the tokens are a prefill's (more than one new token per sequence): the engine stages
        and streams the experts the cache has no room for (docs/design.md, Prefill).
        The transformers path calls this; the fast decode path calls the same phases with its
        static buffers, the kernel and the CPU merge inside CUDA graphs.
        """
        host = self.to_host(x, ids, weights)  # the one sync
        host.prefill = prefill
        step = self.begin(moe_layer, host)
        y = self.moe_kernel(moe_layer, x, ids, weights)
        self.after_kernel(step)
        if step.cpu_experts:
            self.wait_cpu(step)
            y = merge_cpu_partial(y, host.cpu_out)
        self.finish(step)
        return y

    def begin(self, moe_layer: int, host: HostStep) -> StepPlan:
        """Plan MoE layer ``moe_layer``'s step from its host copies, issue the demand copies, make the
        compute stream wait for the slots the kernel reads, and start the CPU experts.

        Called once the host copies in ``host`` are complete (after the step's one sync).
        """
        self.settle()  # a step cut short before this one is completed first
        expert_ids, gate_weights = host.routing()  # [T*K] each
        if self.predictor is not None:
            self._predict(moe_layer, host.ids)
        plan = self.engine.step(moe_layer, expert_ids, gate_weights, host.prefill)
        if self.recorder is not None:
            self.recorder.record(moe_layer, host.ids, host.weights, host.prefill)
        # From here the engine's state runs ahead of the arena's until the transfer engine has the
        # plan; settle() catches up if the step is cut short.
        counts = plan.counts
        step = self._open = StepPlan(moe_layer, host.started_at, plan, len(expert_ids), counts,
                                     plan.cpu_experts if counts[3] else [], counts[4], inputs=host)
        # Demand copies (the slot table written once, stream-ordered), then the waits on the slots read.
        self.transfer.begin_step(moe_layer, plan)
        step.handed = True
        if step.cpu_experts:
            self.cpu_executor.submit(self.pool, moe_layer, host.x, host.ids, host.weights, step.cpu_experts,
                                     host.cpu_out, self.activation)
            step.cpu_submitted = True
        return step

    def settle(self) -> None:
        """Complete what an exception or Ctrl-C left half done (a step begun but not finished, its plan
        not yet handed to the transfer engine): the copies issued, the CPU job waited for (its result
        dropped), the slots released, prefetches and releases applied, the step counted. Afterwards
        slots, events and statistics agree with the engine again. begin() and prefetch_ahead() call it
        (so the engine's plan is not rewritten before the transfer engine has it), and the handle before
        reading statistics or swapping the policy; without such a leftover it does nothing.
        (Copies a native error stopped half-way stay with the transfer engine, which issues them first
        in its next call.)"""
        step = self._open
        if step is None:
            return
        try:
            if step.cpu_submitted and not step.cpu_waited:
                self.cpu_executor.wait()  # a failed job raises once the rest is done (wait() ends it)
        finally:
            step.cpu_waited = True
            if not step.kernel_done:
                self.after_kernel(step)
            self.finish(step, timed=False)  # closes the step: an interrupt before this resumes here

    def moe_kernel(self, moe_layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The fused kernel over MoE layer ``moe_layer``'s slots (reads the slot table on the device, so
        it is graph-capturable): ``[T, H]`` with pairs not resident contributing zero."""
        return self._fused_moe(x, ids, weights, self.arena.slot_table[moe_layer], self.arena.weights,
                               self.layout, out, self.activation)

    def prefetch_ahead(self, moe_layer: int, predicted: torch.Tensor) -> None:
        """Lookahead prefetch: ``predicted`` ``[T, K]`` int64 are the experts of MoE layer ``moe_layer``
        as its router picks them from the hidden state the layer before it just produced (same stream
        as that layer's work). The engine issues copies of the ones not resident, which run while
        this layer's attention does; its step then finds them in their slots (the kernel waits for
        their copies). Counted with the layer before (the step whose output predicted them)."""
        self.settle()
        if predicted.device.type == "cuda":  # the transformers path: wait for the prediction once
            host = self._pred_host.take(predicted.numel()).view(predicted.shape)
            host.copy_(predicted, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            predicted = host
        plan = self.engine.prefetch_ahead(moe_layer, predicted.view(-1).numpy())
        counts = plan.counts
        if counts[5]:
            self.transfer.prefetch(plan)  # the slot table written once
        self.counters[moe_layer - 1].add_prefetches(counts[5], counts[6], self.slot_bytes)

    def after_kernel(self, step: StepPlan) -> None:
        """Release the slots the kernel read, issue prefetches, drop released experts (the transfer
        engine's end_step: prefetches go out after the kernel launch, since one may bring in an expert
        this step runs on the CPU and the kernel must not also see it in the slot table; released experts
        (staged for this step only, TTL/watermark evictions, shrinks) leave the table after the kernel,
        unless this plan already gave their slot to another expert)."""
        if not step.handed and not self.transfer.step_open:
            # Cut short between the plan and handing it over (settle()): the engine's plan is still this
            # step's, since everything that makes a new one settles first.
            self.transfer.begin_step(step.moe_layer, step.plan)
            step.handed = True
        self.transfer.end_step()
        step.kernel_done = True

    def wait_cpu(self, step: StepPlan) -> None:
        """Block until the CPU executor has written this step's partial sum."""
        self.cpu_executor.wait()
        step.cpu_waited = True
        # The executor's own time, not the host's wall time since submit: that also counts whatever the
        # host did meanwhile (a first kernel launch compiling, say) and once taught the cost model that
        # CPU experts cost seconds, after which it never chose the CPU again.
        step.cpu_us = self.cpu_executor.last_job_us

    def finish(self, step: StepPlan, timed: bool = True) -> None:
        """Count the carried-out plan; feed measured times to the cost model when it is used
        (``timed=False``: the step's times were not measured layer by layer)."""
        if self._open is step:
            self._open = None
        self.counters[step.moe_layer].add_step(step.num_pairs, step.counts, self.slot_bytes)
        if self.observe_timings and timed:
            self._observe_timing(step.moe_layer, (time.perf_counter() - step.start) * 1e6, step.cpu_us,
                                 step.cpu_pairs, len(step.cpu_experts))

    def fill_arena(self) -> int:
        """When the arena and the policy's capacity hold every expert, copy them all in now
        (start-up): nothing can miss later, so waiting for first uses would only add misses.
        Returns how many were placed (0 when anything is smaller: which experts to keep is then
        the policy's choice, made as the routing comes)."""
        caps = self.engine.stats()["capacities"]  # [flat capacity] or one per MoE layer
        fits_policy = sum(caps) >= self._total_experts and (len(caps) == 1 or min(caps) >= self.num_experts)
        if self.arena.num_slots < self._total_experts or not fits_policy:
            return 0
        placed = 0
        for moe_layer in range(self.num_layers):
            for expert in range(self.num_experts):
                slot = self.engine.warm(moe_layer, expert)
                if slot >= 0:
                    self.transfer.fetch(moe_layer, expert, slot, True)
                    placed += 1
        self.transfer.synchronize()
        return placed

    def all_resident(self) -> bool:
        """Whether every expert of every MoE layer sits in a slot with its copy landed, so that no step
        can miss (the fast decode path then runs a whole step as one graph and plans afterwards).

        Blocks on the copy streams once after new fetches, never in a steady resident state.
        """
        if self.arena.resident_count < self._total_experts or self.transfer.queued_prefetches:
            return False
        if not self.transfer.settled:
            self.transfer.synchronize()
        return True

    def account(self, moe_layer: int, host: HostStep) -> None:
        """Plan and count a step of MoE layer ``moe_layer`` that the GPU has already run over resident
        slots (:meth:`all_resident`): the engine sees the same accesses as in a planned step, so
        statistics, adapt rules and eviction state stay the same; releases are applied now."""
        step = self.begin(moe_layer, host)
        if step.counts[1] or step.cpu_experts:
            raise RuntimeError(f"moerun internal error: MoE layer {moe_layer} planned {step.counts[1]} fetches and "
                               f"{len(step.cpu_experts)} CPU experts with every expert resident")
        self.after_kernel(step)
        self.finish(step, timed=False)

    def _predict(self, moe_layer: int, ids_host: torch.Tensor) -> None:
        """Learned prefetch: the predictor scores the next layers' experts from this step's routing
        at this layer and the ones before it; the engine gets the best ids with their scores."""
        p = self.predictor
        t, k = ids_host.shape
        self._step_ids[moe_layer] = ids_host.clone()
        hist = torch.full((t, p.history, k), -1, dtype=torch.int64)  # [T, H, K] layers l, l-1, ...
        for j in range(min(p.history, moe_layer + 1)):
            prev = self._step_ids[moe_layer - j]
            if prev is not None and prev.shape[0] == t:  # same step (layers run in order)
                hist[:, j] = prev
        probs = p.predict(hist, torch.full((t,), moe_layer, dtype=torch.int64))  # [T, D, E]
        ids, scores = step_top(probs, torch.zeros(t, dtype=torch.int64), 1, min(self.num_experts, k * t))
        for d in range(1, p.horizon + 1):
            if moe_layer + d < self.num_layers:
                self.engine.observe_prediction(moe_layer + d, ids[0, d - 1].numpy(), scores[0, d - 1].numpy())

    def _observe_timing(self, moe_layer: int, layer_us: float, cpu_us: float, cpu_pairs: int,
                        cpu_experts: int) -> None:
        """Feed measured copy and CPU times to the engine's cost model (hybrid scheduling).

        Copy time and bytes are those of the copies the transfer engine timed since the last call
        (it times a sample of them: dividing by all copied bytes would overstate the bandwidth and
        send every miss to the GPU); layer time is the host's view of the step (it includes the wait
        for the previous layer's GPU work).
        """
        copy_us, copy_bytes = self.transfer.take_copy_timing()
        self.engine.observe_timing(moe_layer, layer_us=layer_us, copy_us=copy_us, copy_bytes=copy_bytes,
                                   cpu_us=cpu_us, cpu_expert_tokens=cpu_pairs, cpu_experts=cpu_experts)

    def to_host(self, x, ids, weights) -> HostStep:
        """Copy x, ids, weights into pinned buffers; wait for the copies once.

        x comes along every step (T*H elements, small at decode) so that experts the plan sends
        to the CPU need no second sync.
        """
        self.settle()  # a CPU job cut short may still read the buffers refilled here
        start = time.perf_counter()
        t, k = ids.shape
        if self.device.type == "cuda":
            buf = self._x_host.setdefault(x.dtype, _PinnedBuffer(x.dtype, True))
            x_host = buf.take(x.numel()).view(x.shape)
            x_host.copy_(x, non_blocking=True)
        else:
            x_host = x
        ids_host = self._ids_host.take(t * k).view(t, k)
        weights_host = self._weights_host.take(t * k).view(t, k)
        ids_host.copy_(ids, non_blocking=True)
        weights_host.copy_(weights, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        cpu_out = self._cpu_out_buf.take(x.numel()).view(x.shape)  # [T, H] fp32
        return HostStep(x=x_host, ids=ids_host, weights=weights_host, cpu_out=cpu_out, started_at=start)

    # -- control --------------------------------------------------------------------------------
    def set_policy(self, policy) -> None:
        """Swap the engine's policy between steps; resident experts stay where they are."""
        setup = self.engine.setup_for(policy)  # PolicyError before anything changes
        predictor = learned_predictor(setup, num_layers=self.num_layers, num_experts=self.num_experts,
                                      top_k=self.engine.shape["top_k"])
        self.engine.set_policy(policy)
        self.lookahead, self.observe_timings = setup.lookahead, setup.observe_timings
        self.predictor = predictor


def merge_cpu_partial(y: torch.Tensor, cpu_out: torch.Tensor) -> torch.Tensor:
    """``y`` ``[T, H]`` plus the CPU executor's fp32 partial ``[T, H]`` (pinned host), summed in fp32.

    Device ops only (an async H2D copy and an add): the fast decode path captures it in a graph.
    """
    partial = cpu_out.to(y.device, non_blocking=True)  # [T, H] fp32
    return (y.float() + partial).to(y.dtype)


def learned_predictor(setup, *, num_layers: int, num_experts: int, top_k: int):
    """The ExpertPredictor loaded from the file an :class:`~moerun.policy.engine_setup.EngineSetup`
    names, or None when it names none; PolicyError when learned prefetch has none, or the file is
    missing or does not fit."""
    path = setup.live_predictor()
    if path is None:
        return None
    return load_predictor(path, num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                          lookahead=setup.prediction_depth)
