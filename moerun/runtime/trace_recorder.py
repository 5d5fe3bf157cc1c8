"""Records the experts each token chose, layer by layer, while ``model.moerun.record_trace`` is open.

One forward pass over T tokens calls every MoE layer once, in order: that pass is one engine step
of the trace (``step_starts``). The recorder keeps each layer's ``[T, K]`` ids and weights and,
when the first MoE layer is called again (or the trace is closed), stacks the finished pass into
``[T, L, K]``. The loader's forward hook marks where prompts begin (a pass with an empty KV cache).
moerun.trace.format defines the file; this module only collects the arrays.
"""
from __future__ import annotations

import numpy as np
import torch


class TraceRecorder:
    """Accumulates routed ids/weights of forward passes; :meth:`arrays` gives the whole trace."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers  # MoE layers, numbered 0..num_layers-1
        self._pass_ids: list[np.ndarray] = []
        self._pass_weights: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []       # each [T, L, K]
        self._weights: list[np.ndarray] = []
        self._pending_prompts: list[int] = []  # prompt starts within the next pass (token offsets)
        self.prompt_starts: list[int] = []
        self.step_starts: list[int] = [0]
        self._pass_prefill = False
        self.prefill_steps: list[bool] = []  # per finished pass: the runtime ran it as a prefill

    def start_prompts(self, batch: int, seq_len: int) -> None:
        """The next pass is a prefill of ``batch`` prompts of ``seq_len`` tokens each."""
        self._close_pass()
        self._pending_prompts = [b * seq_len for b in range(batch)]

    def record(self, layer: int, ids: torch.Tensor, weights: torch.Tensor, prefill: bool = False) -> None:
        """One MoE layer's host copies of ids ``[T, K]`` and weights ``[T, K]``; ``prefill``: the
        runtime runs this step as a prefill's."""
        if layer == 0:
            self._close_pass()
            self._pass_prefill = prefill
        self._pass_ids.append(ids.numpy().astype(np.int32))
        self._pass_weights.append(weights.numpy().astype(np.float32))

    def _close_pass(self) -> None:
        if len(self._pass_ids) == self.num_layers:  # a pass that reached every MoE layer
            ids = np.stack(self._pass_ids, axis=1)  # [T, L, K]
            offset = self.step_starts[-1]
            self.prompt_starts += [offset + p for p in self._pending_prompts] or (
                [] if self.prompt_starts else [offset])
            self._ids.append(ids)
            self._weights.append(np.stack(self._pass_weights, axis=1))
            self.step_starts.append(offset + ids.shape[0])
            self.prefill_steps.append(self._pass_prefill)
            self._pending_prompts = []
        self._pass_ids, self._pass_weights = [], []

    def recorded(self) -> bool:
        """Whether a pass reached every MoE layer (a pass cut short, by an error, counts for nothing)."""
        self._close_pass()
        return bool(self._ids)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(ids [N, L, K] int32, weights [N, L, K] float32, step_starts [S+1], prompt_starts [P])``."""
        self._close_pass()
        if not self._ids:
            raise ValueError("record_trace recorded nothing: no forward pass ran while it was open")
        return (np.concatenate(self._ids), np.concatenate(self._weights),
                np.asarray(self.step_starts, np.int64), np.asarray(self.prompt_starts, np.int64))
