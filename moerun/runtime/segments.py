"""A segment: one piece of a decode step over static buffers, replayed as a CUDA graph.

A segment wraps a function that reads and writes only tensors that outlive it (the step's static
buffers, the KV cache, the model's weights, the arena). On CUDA its first call runs the function
eagerly (that call is the warm-up: Triton compiles, cuBLAS and lazy tensors initialise; two calls
when it has compiled parts), the next call captures it into a CUDA graph in the decoder's shared
memory pool, and every call after that replays the graph. On the CPU (and when capture is switched off) the function simply runs, so the
same step code is what CI tests.

The device-only parts of a segment may be compiled first (:func:`compiled`): a decode step is
dozens of tiny kernels per layer (a norm alone is eight), and inside a graph each still costs its
launch gap on the GPU; the compiler fuses them, and the captured graph replays the fused kernels.

This module knows nothing about models or experts.
"""
from __future__ import annotations

from typing import Callable

import torch


# Compiled decode parts specialize per layer (the attention picks its layer's KV cache by an index)
# and per step shape, beyond torch.compile's default of 8 variants per function; past the limit it
# would silently run the rest eagerly.
_RECOMPILE_LIMIT = 512


def compiled(fn: Callable[..., None], backend: str) -> Callable[..., None]:
    """``fn`` compiled by ``torch.compile`` (``backend``: "inductor" fuses kernels; "eager" only
    traces, for tests), rounding as eager does, with room for a variant per layer and step shape.

    Raises torch's recompile limits (process-wide settings of torch._dynamo) to at least 512.
    """
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * _RECOMPILE_LIMIT)
    options = {"emulate_precision_casts": True} if backend == "inductor" else None
    return torch.compile(fn, backend=backend, dynamic=False, options=options)


class Segment:
    """``fn`` run eagerly, or captured once and replayed (see the module docstring)."""

    def __init__(self, name: str, fn: Callable[[], None], *, capture: bool, pool=None, warmup: int = 1):
        self.name = name
        self.fn = fn
        self.warmup = warmup  # eager calls before capture (compiled parts: compile, then settle guards)
        self.capture = capture
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.replays = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return
        if not self.capture or self.calls <= self.warmup:
            self.fn()
            return
        graph = torch.cuda.CUDAGraph()
        # thread_local: the transfer engine and CPU executor threads may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.fn()
        self.graph = graph
        graph.replay()
        self.replays += 1
