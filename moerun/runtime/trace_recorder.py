"""Records the experts each token chose, layer by layer, while ``model.moerun.record_trace`` is open.

One forward pass over T tokens calls every MoE layer once in order; the recorder keeps each
layer's ``[T, K]`` ids and weights and, when the first MoE layer is called again, stacks the
finished pass into ``[T, L, K]``. A pass over more than one token (a prefill) starts a new prompt.
The file is written by moerun.trace.format, which defines the format.
"""
from __future__ import annotations

import numpy as np
import torch


class TraceRecorder:
    """Accumulates routed ids/weights of forward passes; ``arrays()`` gives the whole trace."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers  # MoE layers, numbered 0..num_layers-1
        self._first = 0
        self._pass_ids: list[np.ndarray] = []
        self._pass_weights: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []       # each [T, L, K]
        self._weights: list[np.ndarray] = []
        self.prompt_starts: list[int] = []     # token index where each prompt begins
        self._tokens = 0

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """One layer's host copies of ids ``[T, K]`` and weights ``[T, K]``."""
        if layer == self._first:
            self._close_pass()
        self._pass_ids.append(ids.numpy().astype(np.int32))
        self._pass_weights.append(weights.numpy().astype(np.float32))

    def _close_pass(self) -> None:
        if not self._pass_ids:
            return
        if len(self._pass_ids) == self.num_layers:  # a pass that reached every MoE layer
            ids = np.stack(self._pass_ids, axis=1)  # [T, L, K]
            if ids.shape[0] > 1 or not self.prompt_starts:
                self.prompt_starts.append(self._tokens)
            self._ids.append(ids)
            self._weights.append(np.stack(self._pass_weights, axis=1))
            self._tokens += ids.shape[0]
        self._pass_ids, self._pass_weights = [], []

    def arrays(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``(ids [N, L, K] int32, weights [N, L, K] float32, prompt_starts)`` of all passes."""
        self._close_pass()
        if not self._ids:
            return np.zeros((0, self.num_layers, 0), np.int32), np.zeros((0, self.num_layers, 0), np.float32), []
        return np.concatenate(self._ids), np.concatenate(self._weights), list(self.prompt_starts)
