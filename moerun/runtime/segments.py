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


def compiled(fn: Callable[[], None], name: str, backend: str) -> Callable[[], None]:
    """``fn`` compiled by ``torch.compile`` with its own compile cache.

    The per-layer closures of a decode step share one code object, and torch.compile keys its
    cache (and its recompile limit) by code object: every layer would count as a recompile of the
    first and the limit would drop later layers to eager. A fresh top-level code object per
    segment keeps one cache entry per segment.
    """
    namespace = {"_fn": fn}
    exec(compile("def segment():\n    _fn()\n", f"<moerun segment {name}>", "exec"), namespace)  # noqa: S102
    options = {"emulate_precision_casts": True} if backend == "inductor" else None  # round as eager does
    return torch.compile(namespace["segment"], backend=backend, dynamic=False, options=options)


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
