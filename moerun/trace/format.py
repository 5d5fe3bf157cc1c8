"""The routing-trace format: what a model's router chose, token by token, layer by layer.

A trace is one ``.npz`` file (numpy's zip of arrays, no pickles) holding:

=================  ================  ==========================================================
array              dtype, shape      meaning
=================  ================  ==========================================================
``expert_ids``     int32 [N, L, K]   routed expert of token n at MoE layer l, k-th choice
``gate_weights``   float32 [N, L, K] its gate weight (what the MoE output is scaled by)
``step_starts``    int64 [S + 1]     token offsets of the engine steps: step s runs tokens
                                     ``step_starts[s]:step_starts[s+1]`` together through every
                                     layer (a prefill chunk, or a decode step of a batch)
``prompt_starts``  int64 [P]         token offset where each prompt (sequence) begins
``prefill_steps``  uint8 [S]         optional: 1 where the runtime ran the step as a prefill (more than one
                                     new token per sequence); absent: no step is (replay runs them all
                                     as decode steps)
``meta``           str (JSON)        ``{"format": "moerun-trace", "version": 1, "model": ...,
                                     "arch": ..., "num_layers": L, "num_experts": E, "top_k": K,
                                     "expert_bytes": bytes of one expert (0 if unknown)}``
=================  ================  ==========================================================

N = tokens, L = MoE layers, K = experts per token, E = routed experts per layer, S = steps.
:func:`read_trace` validates everything and raises :class:`TraceError` naming what is wrong.
This module knows nothing about policies or the engine.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moerun.files import atomic_write, read_npz

FORMAT_NAME = "moerun-trace"
FORMAT_VERSION = 1
# Experts per layer a trace may claim: more than any MoE model has (hundreds), few enough that the
# per-expert tables of replay and stats stay small. The engine's (layer, expert) keys are int32.
MAX_EXPERTS = 1 << 16
_INT32_MAX = int(np.iinfo(np.int32).max)
_INT64_MAX = int(np.iinfo(np.int64).max)


class TraceError(ValueError):
    """A trace file that is missing, malformed, or inconsistent with the model it claims."""


@dataclass
class Trace:
    """One routing trace in memory (arrays as in the module docstring)."""

    expert_ids: np.ndarray             # [N, L, K] int32
    gate_weights: np.ndarray           # [N, L, K] float32
    step_starts: np.ndarray            # [S + 1] int64
    prompt_starts: np.ndarray          # [P] int64
    num_experts: int
    prefill_steps: np.ndarray | None = None  # [S] uint8, or None: no step is a prefill
    model: str = "unknown"
    arch: str = "unknown"
    expert_bytes: int = 0
    extra: dict = field(default_factory=dict)  # free-form provenance (seed, workload, ...)

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def num_steps(self) -> int:
        return int(self.step_starts.shape[0] - 1)

    @property
    def num_accesses(self) -> int:
        return int(self.expert_ids.size)

    def meta(self) -> dict:
        return dict(format=FORMAT_NAME, version=FORMAT_VERSION, model=self.model, arch=self.arch,
                    num_layers=self.num_layers, num_experts=self.num_experts, top_k=self.top_k,
                    expert_bytes=self.expert_bytes, extra=self.extra)

    def validate(self, where: str = "trace") -> "Trace":
        """Check shapes, dtypes, ranges and offsets; raise TraceError with the numbers."""
        ids, w = self.expert_ids, self.gate_weights
        if ids.ndim != 3:
            raise TraceError(f"{where}: expert_ids must be [tokens, layers, k], got shape {ids.shape}")
        if w.shape != ids.shape:
            raise TraceError(f"{where}: gate_weights shape {w.shape} differs from expert_ids shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TraceError(f"{where}: expert_ids must be integers, got {ids.dtype}")
        if not np.issubdtype(w.dtype, np.floating):
            raise TraceError(f"{where}: gate_weights must be floats, got {w.dtype}")
        if ids.shape[1] < 1 or ids.shape[2] < 1:
            raise TraceError(f"{where}: expert_ids has shape {ids.shape}: a trace needs >= 1 layer and k >= 1")
        if not 0 < self.num_experts <= MAX_EXPERTS:
            raise TraceError(f"{where}: num_experts must be in 1..{MAX_EXPERTS}, got {self.num_experts}")
        if self.num_layers * self.num_experts > _INT32_MAX:
            raise TraceError(f"{where}: {self.num_layers} layers x {self.num_experts} experts is more "
                             f"(layer, expert) pairs than the engine numbers ({_INT32_MAX})")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_experts:
                bad = hi if hi >= self.num_experts else lo
                raise TraceError(f"{where}: expert id {bad} is outside 0..{self.num_experts - 1} "
                                 f"(the model has {self.num_experts} experts per layer)")
        if self.top_k > self.num_experts:
            raise TraceError(f"{where}: k={self.top_k} exceeds num_experts={self.num_experts}")
        s = self.step_starts
        if s.ndim != 1 or s.size < 1 or s[0] != 0 or s[-1] != self.num_tokens or np.any(np.diff(s) < 0):
            raise TraceError(f"{where}: step_starts must rise from 0 to the token count {self.num_tokens}, "
                             f"got {s.ravel()[:3].tolist()}...{s.ravel()[-3:].tolist()} ({s.size} entries, "
                             f"shape {s.shape})")
        p = self.prompt_starts
        if p.ndim != 1 or (p.size and (p[0] != 0 or np.any(np.diff(p) <= 0) or p[-1] >= max(self.num_tokens, 1))):
            raise TraceError(f"{where}: prompt_starts must rise strictly from 0 below the token count "
                             f"{self.num_tokens}, got {p.ravel()[:8].tolist()} (shape {p.shape})")
        f = self.prefill_steps
        if f is not None and (f.shape != (self.num_steps,) or f.dtype.kind not in "biu" or np.any((f != 0) & (f != 1))):
            raise TraceError(f"{where}: prefill_steps must be one 0/1 flag per step ({self.num_steps}), got "
                             f"shape {f.shape} dtype {f.dtype}")
        return self

    def check_model(self, *, num_layers: int, num_experts: int, top_k: int | None = None, where: str = "trace",
                    model: str = "the model") -> None:
        """Raise TraceError unless the trace fits a model of this shape (``where`` names the trace in the
        message, ``model`` what it is compared with)."""
        if self.num_layers != num_layers:
            raise TraceError(f"{where} has {self.num_layers} MoE layers but {model} has {num_layers}")
        if self.num_experts > num_experts or int(self.expert_ids.max(initial=0)) >= num_experts:
            raise TraceError(f"{where} routes to experts up to {int(self.expert_ids.max(initial=0))} "
                             f"(num_experts {self.num_experts}) but {model} has {num_experts} experts per layer")
        if top_k is not None and self.top_k != top_k:
            raise TraceError(f"{where} has k={self.top_k} experts per token but {model} routes top-{top_k}")


def write_trace(path: str | os.PathLike, trace: Trace) -> Path:
    """Validate and write ``trace`` to ``path`` (``.npz``), atomically; returns the path."""
    trace.validate(str(path))
    with atomic_write(path, what="trace") as f:  # a file object keeps numpy from appending ".npz"
        np.savez_compressed(
            f, expert_ids=trace.expert_ids.astype(np.int32), gate_weights=trace.gate_weights.astype(np.float32),
            step_starts=trace.step_starts.astype(np.int64), prompt_starts=trace.prompt_starts.astype(np.int64),
            meta=np.array(json.dumps(trace.meta())),
            **({} if trace.prefill_steps is None else {"prefill_steps": trace.prefill_steps.astype(np.uint8)}))
    return Path(path)


def read_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a trace; TraceError says what is missing or wrong (a file that is not a
    trace at all, corrupt or truncated, is one too)."""
    try:
        arrays, meta = read_npz(path, "trace", about=ABOUT_TRACES)
    except (OSError, ValueError) as exc:
        raise TraceError(str(exc)) from None
    missing = [k for k in ("expert_ids", "gate_weights", "step_starts", "prompt_starts") if k not in arrays]
    if missing:
        raise TraceError(f"{path}: missing arrays {missing}; see moerun.trace.format for the layout")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise TraceError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this moerun reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise TraceError(f"{path}: meta 'extra' must be a JSON object, got {type(extra).__name__}")
    # Checked as stored, before any cast: float ids must not be truncated, nor wide ones wrapped.
    trace = Trace(expert_ids=_integers(path, arrays, "expert_ids"), gate_weights=arrays["gate_weights"],
                  step_starts=_integers(path, arrays, "step_starts"),
                  prompt_starts=_integers(path, arrays, "prompt_starts"),
                  prefill_steps=arrays.get("prefill_steps"), num_experts=_meta_int(path, meta, "num_experts", 0), model=str(meta.get("model", "unknown")),
                  arch=str(meta.get("arch", "unknown")), expert_bytes=_meta_int(path, meta, "expert_bytes", 0),
                  extra=extra)
    trace.validate(str(path))
    for key, value in (("num_layers", trace.num_layers), ("top_k", trace.top_k)):
        if key in meta and _meta_int(path, meta, key, 0) != value:
            raise TraceError(f"{path}: meta says {key}={meta[key]} but expert_ids has {value}")
    trace.expert_ids = trace.expert_ids.astype(np.int32)
    trace.gate_weights = trace.gate_weights.astype(np.float32, copy=False)
    return trace


ABOUT_TRACES = ("a trace is an .npz archive of a model's routing (expert_ids, gate_weights, step_starts, ...) that "
                "model.moerun.record_trace(path) records and `moerun trace synth` writes")


def _integers(path, arrays: dict, name: str) -> np.ndarray:
    """``arrays[name]`` as int64; TraceError when it does not hold integers that fit."""
    a = arrays[name]
    if a.dtype.kind not in "iu":
        raise TraceError(f"{path}: {name} must hold integers, got {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > _INT64_MAX:
        raise TraceError(f"{path}: {name} holds {int(a.max())}, beyond any token count or expert id")
    return a.astype(np.int64, copy=False)


def _meta_int(path, meta: dict, key: str, default: int) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        raise TraceError(f"{path}: meta {key} must be a whole number >= 0, got {value!r}")
    return value
