"""A segment: one piece of a decode step over static buffers, replayed as a CUDA graph.

A segment wraps a function that reads and writes only tensors that outlive it (the step's static
buffers, the KV cache, the model's weights, the arena). On CUDA its first call runs the function
eagerly (that call is the warm-up: Triton compiles, cuBLAS and lazy tensors initialise), its second
call captures it into a CUDA graph in the decoder's shared memory pool, and every call after that
replays the graph. On the CPU (and when capture is switched off) the function simply runs, so the
same step code is what CI tests.

This module knows nothing about models or experts.
"""
from __future__ import annotations

from typing import Callable

import torch


class Segment:
    """``fn`` run eagerly, or captured once and replayed (see the module docstring)."""

    def __init__(self, name: str, fn: Callable[[], None], *, capture: bool, pool=None):
        self.name = name
        self.fn = fn
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
        if not self.capture or self.calls == 1:
            self.fn()
            return
        graph = torch.cuda.CUDAGraph()
        # thread_local: the transfer engine and CPU executor threads may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.fn()
        self.graph = graph
        graph.replay()
        self.replays += 1
