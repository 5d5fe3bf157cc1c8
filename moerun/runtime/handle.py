"""``model.moerun``: what a loaded model exposes about its offloading.

stats() — runtime counters per layer and in total, merged with the policy engine's statistics
(hit rate, prefetch accuracy, adapt firings); set_policy() — hot swap between steps; record_trace()
— a context manager writing the experts chosen while it is open in the trace format; memory() —
device bytes of skeleton / KV reserve / arena and host bytes of the pool; fast_decode — the switch
of the fast decode path (fast_decode.py); generate_loop — the switch of moerun's generate() loop
(decode_loop.py); profile_decode() — a context manager collecting its
per-layer time breakdown; tokenizer — the checkpoint's tokenizer when it has one.

Threads: one model runs one thing at a time. ``handle.lock`` (re-entrant) is held by the model's
generate() and forward() and by stats(), reset_stats() and set_policy(), so calls from several
threads take turns, each as if it ran alone (same tokens as run one after another). Serving many
requests at once belongs in one loop that batches them, not in threads racing on one model.
"""
from __future__ import annotations

import numpy as np

import contextlib
import functools
import threading
import weakref
from pathlib import Path
from typing import Iterator

from ..transformers_contract import CACHE_ARGUMENT_NAMES
from .decode_profile import DecodeProfile
from .fast_decode import FastDecoder
from .memory import MemoryPlan
from .offload import OffloadRuntime
from .layer_counters import LayerCounters, summarize
from .trace_recorder import TraceRecorder


def _serialised(method):
    """Run ``method`` under the handle's lock, after any step an interrupt cut short is completed."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            self.runtime.settle()
            return method(self, *args, **kwargs)
    return locked


class MoerunHandle:
    """Offloading controls of one model returned by :func:`moerun.load`.

    ``lock`` serialises the model's generate() and forward() with stats(), reset_stats() and
    set_policy() (see the module docstring): a second thread waits for the first to finish.
    """

    def __init__(self, *, model, runtime: OffloadRuntime, decoder: FastDecoder, plan: MemoryPlan,
                 moe_layers: list[int], checkpoint_path: Path, pool_bytes: int, policy, model_info: dict):
        self._model = weakref.ref(model)  # the model holds this handle: no reference cycle
        self.runtime = runtime
        self.decoder = decoder
        self.plan = plan
        self.moe_layers = list(moe_layers)
        self.checkpoint_path = checkpoint_path
        self.pool_bytes = pool_bytes
        self.policy = policy
        self._host_block = policy.host  # the host tier is built at load from this (the pool's size, eviction)
        self.model_info = dict(model_info)
        self.load_seconds: dict[str, float] = {}  # load()'s stages, in order: where the load time went
        self._tokenizer = None
        self.lock = threading.RLock()
        _serialise_entry_points(model, self.lock)

    @_serialised
    def stats(self) -> dict:
        """Counters since load or the last reset: hits, misses, fetches, bytes, CPU share, per layer,
        plus the engine's own statistics under ``"engine"`` and the host pool's under ``"host"``
        (``hits``/``misses``: expert acquires served from host memory / read from disk, ``disk_bytes``,
        ``disk_time_us``, ``evictions``, ``slot_waits``, ``prefetch_reads``; a pool holding every
        expert only counts hits)."""
        self.decoder.flush_accounting()
        # Keyed by the model's decoder-layer index (the runtime counts MoE layers only).
        counters = {layer: self.runtime.counters[i] for i, layer in enumerate(self.moe_layers)}
        out = summarize(counters)
        out["engine"] = self.runtime.engine.stats()
        out["prefetch_accuracy"] = out["engine"].get("prefetch_accuracy", 0.0)
        out["host"] = self.runtime.pool.stats()
        out["decode"] = self.decoder.stats()
        return out

    @_serialised
    def reset_stats(self) -> None:
        """Start the runtime's counters (everything :meth:`stats` sums per layer) from zero; the
        engine's own statistics under ``"engine"`` keep counting since load (they drive its policy)."""
        self.decoder.flush_accounting()
        for i in range(len(self.runtime.counters)):
            self.runtime.counters[i] = LayerCounters()

    @property
    def fast_decode(self) -> bool:
        """Whether decode steps run through the fast path (CUDA graphs over a static KV cache).

        Set it to False for transformers' layers (the reference path); setting True where the model
        cannot use the fast path leaves it off with a one-line notice.
        """
        return self.decoder.enabled

    @fast_decode.setter
    def fast_decode(self, enabled: bool) -> None:
        self.decoder.set_enabled(bool(enabled))

    @property
    def generate_loop(self) -> bool:
        """Whether fast-path generate() calls run moerun's loop, which reads the stop decision one step
        late so host work overlaps the GPU (runtime/decode_loop.py); False runs transformers' loop
        (the same tokens; a benchmark compares the two). Where this transformers lacks what the loop
        calls, it stays unused (``stats()["decode"]["loop_off_reason"]``)."""
        return self.decoder.own_loop and self.decoder.loop_off_reason is None

    @generate_loop.setter
    def generate_loop(self, enabled: bool) -> None:
        self.decoder.own_loop = bool(enabled)

    @contextlib.contextmanager
    def profile_decode(self) -> Iterator[DecodeProfile]:
        """Collect the per-layer time breakdown of fast-path decode steps while open
        (``profile.summary()``); device phases are timed with CUDA events."""
        if self.decoder.profile is not None:
            raise RuntimeError("profile_decode is already open on this model; close it before opening another")
        profile = DecodeProfile(self.decoder.device)
        self.decoder.profile = profile
        try:
            yield profile
        finally:
            self.decoder.profile = None

    @_serialised
    def set_policy(self, policy) -> None:
        """Replace the policy (a compiled policy, ``.moe`` text, path or bundled name) between steps.

        Resident experts stay; the next step plans under the new policy. The host tier (the pool's
        capacity, eviction and watermarks) is built at load: a policy without a ``host`` block keeps it,
        one whose ``host`` block differs from the loaded one is refused (ValueError) and the old policy
        stays; reload with that policy (or ``host_budget``) to change it.
        """
        from ..loader import _compile_policy

        compiled = _compile_policy(policy, len(self.moe_layers), self.model_info["num_experts"])
        _check_host_block(compiled.host, self._host_block)
        self.decoder.flush_accounting()  # the last step counts under the policy it ran with
        self.runtime.set_policy(compiled)
        self.policy = compiled

    @contextlib.contextmanager
    def record_trace(self, path: str | Path) -> Iterator[TraceRecorder]:
        """Record every MoE step while open; write the trace (moerun.trace.format) to ``path`` on exit.

        Each forward pass is one step of the trace; a pass that starts with an empty KV cache starts
        one prompt per sequence of its batch. When the body raises (an error, Ctrl-C), the steps that
        completed before it are written all the same (a pass cut short is left out; nothing is written
        when none completed), then the exception goes on.
        """
        from ..files import check_writable

        check_writable(path, "trace")  # a bad path fails now, not after the generation
        if self.runtime.recorder is not None:
            raise RuntimeError("record_trace is already open on this model; close it before opening another")
        self.decoder.flush_accounting()  # a step before the trace opened stays out of it
        recorder = TraceRecorder(len(self.moe_layers))
        hook = self._model().get_decoder().register_forward_pre_hook(_prompt_marker(recorder), with_kwargs=True)
        self.runtime.recorder = recorder
        try:
            yield recorder
        except BaseException:
            self._stop_recording(hook)
            if recorder.recorded():
                self._write_trace(path, recorder)  # the steps that completed are kept
            raise
        self._stop_recording(hook)
        self._write_trace(path, recorder)

    def _stop_recording(self, hook) -> None:
        self.decoder.flush_accounting()
        self.runtime.recorder = None
        hook.remove()

    def _write_trace(self, path: str | Path, recorder: TraceRecorder) -> None:
        from ..trace.format import Trace, write_trace

        ids, weights, step_starts, prompt_starts = recorder.arrays()
        info = self.model_info
        write_trace(path, Trace(
            expert_ids=ids, gate_weights=weights, step_starts=step_starts, prompt_starts=prompt_starts,
            prefill_steps=np.asarray(recorder.prefill_steps, np.uint8),
            num_experts=info["num_experts"], model=info["path"], arch=info["model_type"],
            expert_bytes=self.plan.slot_bytes,
            extra={"moe_layers": self.moe_layers, "policy": getattr(self.policy, "name", "")},
        ))

    def memory(self) -> dict:
        """Bytes: device ``{skeleton, kv_cache_reserve, workspace_reserve, arena, budget}``; host ``{pool}``
        with ``capacity`` (experts the pool holds) and ``experts`` (routed experts of the model): a
        capacity below ``experts`` means the pool caches experts in front of the files. ``experts`` tells
        how the experts are stored: their format, bits per stored weight and bytes per slot."""
        p, pool = self.plan, self.runtime.pool
        layout = pool.layout
        return {
            "experts": {"format": layout.format, "weight_bits": layout.weight_bits, "slot_bytes": layout.slot_bytes,
                        "checkpoint_quantization": self.model_info.get("checkpoint_quantization", "float")},
            "device": {"skeleton": p.skeleton_bytes, "kv_cache_reserve": p.kv_cache_bytes,
                       "workspace_reserve": p.workspace_bytes, "arena": p.arena_bytes,
                       "num_slots": p.num_slots, "slot": p.slot_bytes, "budget": p.budget_bytes},
            "host": {"pool": self.pool_bytes, "capacity": pool.capacity,
                     "experts": pool.num_layers * pool.num_experts, "slot": pool.slot_bytes},
        }

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer; a clear error when the checkpoint has none."""
        if self._tokenizer is None:
            from ..checkpoint import read_tokenizer

            tokenizer, fault = read_tokenizer(self.checkpoint_path)
            if fault is not None:
                raise RuntimeError(
                    f"{self.checkpoint_path} has no usable tokenizer ({fault.why}), so text "
                    "cannot be encoded or decoded; generate() still works on token ids "
                    f"(model.generate(input_ids=...)). To use text, {fault.remedy()}."
                )
            self._tokenizer = tokenizer
        return self._tokenizer


def _check_host_block(new, loaded) -> None:
    """ValueError when a new policy's ``host`` block (HostConfig, or None: no block) asks for another host
    tier than the one ``loaded`` (the load's block, or None) built: the pool is sized at load."""
    from ..policy.ir import AUTO, HostConfig

    if new is None or new == (loaded or HostConfig()):
        return

    def tier(h: HostConfig) -> str:
        capacity = "auto" if h.capacity == AUTO else h.capacity
        return (f"capacity = {capacity}  eviction = {h.eviction}  high_watermark = {h.high_watermark}  "
                f"low_watermark = {h.low_watermark}")

    raise ValueError(
        f"set_policy: the new policy's host {{ {tier(new)} }} differs from the host tier this model was loaded "
        f"with, host {{ {tier(loaded or HostConfig())} }}; the host pool is built at load and stays as it is. "
        "Drop the host block from the new policy to keep the loaded tier, or load the model again with this "
        "policy (moerun.load(..., policy=...), with host_budget= for a byte limit) to change it. The old "
        "policy is still in effect.")


def _serialise_entry_points(model, lock: threading.RLock) -> None:
    """The model's generate() and forward() (instance attributes: the fast decode path's) run under
    ``lock``; generate's own forwards re-enter it."""
    for name in ("generate", "forward"):
        inner = getattr(model, name)

        @functools.wraps(inner)  # keeps the signature generate() inspects
        def locked(*args, _inner=inner, **kwargs):
            with lock:
                return _inner(*args, **kwargs)
        setattr(model, name, locked)


def _prompt_marker(recorder: TraceRecorder):
    """Forward pre-hook of the decoder: a pass with an empty KV cache starts new prompts."""

    def hook(module, args, kwargs):
        cache = next((kwargs[name] for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None), None)
        if cache is None or cache.get_seq_length() == 0:
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            batch, seq_len = (ids if ids is not None else embeds).shape[:2]
            recorder.start_prompts(batch, seq_len)

    return hook
