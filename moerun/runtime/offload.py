"""The per-layer expert step: ids to the host (the one sync), plan, copies, CPU experts, fused MoE.

``OffloadRuntime`` owns what the MoE layers of one model share: the slot arena, the host pool,
the transfer engine, the CPU executor and the policy engine. ``run(layer, x, ids, weights)``
carries out one layer's step as DESIGN.md draws it (``layer`` counts MoE layers only: it is the
engine's, the arena's and the pool's layer id, so dense layers cost no slots):

1. the chosen ids and gate weights go to pinned host buffers; waiting on that copy is the step's
   only host sync;
2. the native policy engine plans: hits, fetches (slot + victim), CPU experts, prefetches;
3. the transfer engine copies fetched and prefetched experts pool -> slot on its copy streams
   (a copy into a slot waits until the last kernel reading the slot is done);
4. the CPU executor starts the CPU experts' tokens on host threads;
5. the compute stream waits on exactly the slots it reads, the fused kernel runs over the slots
   (pairs not resident contribute zero), and the slots' release events are recorded;
6. the CPU partial sum is added.

This module decides nothing: the engine decides, the mechanism moves bytes. It knows nothing
about transformers modules (see moe_layer.py).
"""
from __future__ import annotations

import torch

from .stats import LayerCounters
from .trace_recorder import TraceRecorder


class _PinnedBuffer:
    """A reusable host buffer for device -> host copies, grown when a step needs more room."""

    def __init__(self, dtype: torch.dtype, pin: bool):
        self.dtype, self.pin = dtype, pin
        self.buf = torch.empty(0, dtype=dtype, pin_memory=pin)

    def take(self, numel: int) -> torch.Tensor:
        if self.buf.numel() < numel:
            self.buf = torch.empty(max(numel, 2 * self.buf.numel()), dtype=self.dtype, pin_memory=self.pin)
        return self.buf[:numel]


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
        inter_size: int,
        num_layers: int,
        num_experts: int,
        slot_bytes: int,
        device: torch.device,
        lookahead: bool,
    ):
        self.engine = engine
        self.arena = arena
        self.pool = pool
        self.transfer = transfer
        self.cpu_executor = cpu_executor
        self.inter_size = inter_size
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.slot_bytes = slot_bytes
        self.device = device
        self.lookahead = lookahead
        self.counters = [LayerCounters() for _ in range(num_layers)]
        self.recorder: TraceRecorder | None = None
        on_cuda = device.type == "cuda"
        self._ids_host = _PinnedBuffer(torch.int64, on_cuda)
        self._weights_host = _PinnedBuffer(torch.float32, on_cuda)
        self._pred_host = _PinnedBuffer(torch.int64, on_cuda)

    # -- the step -------------------------------------------------------------------------------
    def run(
        self,
        layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        predicted: tuple[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Routed-expert output ``[T, H]`` (x.dtype) of layer ``layer`` for tokens ``x`` ``[T, H]``.

        ``ids`` ``[T, K]`` and ``weights`` ``[T, K]`` (fp32) are the router's choice on x's device;
        ``predicted`` = (next layer, its predicted ids ``[T, K]``) feeds lookahead prefetch.
        """
        ids_host, weights_host, pred_host = self._to_host(ids, weights, predicted)  # the one sync
        expert_ids = ids_host.view(-1).tolist()  # the layer's T*K routed ids
        if pred_host is not None:
            self.engine.observe_prediction(predicted[0], pred_host.view(-1).tolist())
        plan = self.engine.step(layer, expert_ids, weights_host.view(-1).tolist())
        if self.recorder is not None:
            self.recorder.record(layer, ids_host, weights_host)

        for expert, slot, _, _ in plan.fetches:
            self.transfer.fetch(layer, expert, slot, True)
            self.arena.assign(slot, layer, expert)
        for p_layer, p_expert, slot, _, _ in plan.prefetches:
            self.transfer.fetch(p_layer, p_expert, slot, False)
            self.arena.assign(slot, p_layer, p_expert)

        cpu_experts = list(plan.cpu)
        if cpu_experts:
            self._start_cpu(layer, x, ids, weights, ids_host, cpu_experts)

        slots = [slot for _, slot in plan.hits] + [slot for _, slot, _, _ in plan.fetches]
        self.transfer.wait_slots(slots)
        from moerun.kernels.fused_moe import fused_moe  # imported late: Triton mode is set at load

        y = fused_moe(x, ids, weights, self.arena.slot_table[layer], self.arena.weights, self.inter_size)
        self.transfer.release_slots(slots)
        if cpu_experts:
            y = self._add_cpu(y)
        self.counters[layer].add_plan(plan, num_pairs=len(expert_ids), slot_bytes=self.slot_bytes)
        return y

    def _to_host(self, ids, weights, predicted):
        """Copy ids/weights (and predicted ids) into pinned buffers; wait for the copies once."""
        t, k = ids.shape
        ids_host = self._ids_host.take(t * k).view(t, k)
        weights_host = self._weights_host.take(t * k).view(t, k)
        ids_host.copy_(ids, non_blocking=True)
        weights_host.copy_(weights, non_blocking=True)
        pred_host = None
        if predicted is not None:
            pred = predicted[1]
            pred_host = self._pred_host.take(pred.numel()).view(pred.shape)
            pred_host.copy_(pred, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return ids_host, weights_host, pred_host

    def _start_cpu(self, layer, x, ids, weights, ids_host, cpu_experts) -> None:
        """Start the CPU executor on the (token, expert) pairs whose expert runs on the CPU."""
        self.cpu_executor.submit(layer, x, ids_host, weights, cpu_experts)

    def _add_cpu(self, y: torch.Tensor) -> torch.Tensor:
        partial = self.cpu_executor.wait()  # [T, H] fp32 on the host
        return (y.float() + partial.to(y.device, non_blocking=True)).to(y.dtype)

    # -- control --------------------------------------------------------------------------------
    def set_policy(self, policy) -> None:
        """Swap the engine's policy between steps; resident experts stay where they are."""
        self.engine.set_policy(policy)
