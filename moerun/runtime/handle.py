"""``model.moerun``: what a loaded model exposes about its offloading.

stats() — runtime counters per layer and in total, merged with the policy engine's statistics
(hit rate, prefetch accuracy, adapt firings); set_policy() — hot swap between steps; record_trace()
— a context manager writing the experts chosen while it is open in the trace format; memory() —
device bytes of skeleton / KV reserve / arena and host bytes of the pool; tokenizer — the
checkpoint's tokenizer when it has one.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from .memory import MemoryPlan
from .offload import OffloadRuntime
from .stats import summarize
from .trace_recorder import TraceRecorder


class MoerunHandle:
    """Offloading controls of one model returned by :func:`moerun.load`."""

    def __init__(self, *, runtime: OffloadRuntime, plan: MemoryPlan, moe_layers: list[int],
                 checkpoint_path: Path, pool_bytes: int, policy, model_info: dict):
        self.runtime = runtime
        self.plan = plan
        self.moe_layers = list(moe_layers)
        self.checkpoint_path = checkpoint_path
        self.pool_bytes = pool_bytes
        self.policy = policy
        self.model_info = dict(model_info)
        self._tokenizer = None

    def stats(self) -> dict:
        """Counters since load or the last reset: hits, misses, fetches, bytes, CPU share, per layer,
        plus the engine's own statistics under ``"engine"``."""
        # Keyed by the model's decoder-layer index (the runtime counts MoE layers only).
        counters = {layer: self.runtime.counters[i] for i, layer in enumerate(self.moe_layers)}
        out = summarize(counters)
        out["engine"] = self.runtime.engine.stats()
        out["prefetch_accuracy"] = out["engine"].get("prefetch_accuracy", 0.0)
        return out

    def set_policy(self, policy) -> None:
        """Replace the policy (a compiled policy, ``.moe`` text, path or bundled name) between steps.

        Resident experts stay; the next step plans under the new policy.
        """
        from ..policy import compile_policy

        compiled = policy if not isinstance(policy, (str, Path)) else compile_policy(policy)
        self.runtime.set_policy(compiled)
        self.policy = compiled

    @contextlib.contextmanager
    def record_trace(self, path: str | Path) -> Iterator[TraceRecorder]:
        """Record every MoE step while open; write the trace to ``path`` on exit."""
        if self.runtime.recorder is not None:
            raise RuntimeError("record_trace is already open on this model; close it before opening another")
        recorder = TraceRecorder(len(self.moe_layers))
        self.runtime.recorder = recorder
        try:
            yield recorder
        finally:
            self.runtime.recorder = None
        self._write_trace(Path(path), recorder)

    def _write_trace(self, path: Path, recorder: TraceRecorder) -> None:
        raise RuntimeError("trace format not wired yet")

    def memory(self) -> dict:
        """Bytes: device ``{skeleton, kv_cache_reserve, workspace_reserve, arena, budget}``, host ``{pool}``."""
        p = self.plan
        return {
            "device": {"skeleton": p.skeleton_bytes, "kv_cache_reserve": p.kv_cache_bytes,
                       "workspace_reserve": p.workspace_bytes, "arena": p.arena_bytes,
                       "num_slots": p.num_slots, "slot": p.slot_bytes, "budget": p.budget_bytes},
            "host": {"pool": self.pool_bytes},
        }

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer; a clear error when the checkpoint has none."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.checkpoint_path)
            except (OSError, ValueError, TypeError) as exc:
                raise RuntimeError(
                    f"{self.checkpoint_path} has no usable tokenizer ({type(exc).__name__}), so text "
                    "cannot be encoded or decoded; generate() still works on token ids "
                    "(model.generate(input_ids=...)). Add tokenizer files to the checkpoint "
                    "directory to use text."
                ) from exc
        return self._tokenizer
