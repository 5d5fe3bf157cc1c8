"""Continuous batching: many requests decoded together, each in a row of the static KV cache.

The engine owns one loaded model (``moerun.load(..., max_batch=N)``) and its static KV cache taken
as ``N`` rows (runtime/row_cache.py), each row one sequence at its own position. One iteration
(:meth:`BatchingEngine.step`):

1. cancellations are applied: a cancelled sequence leaves its row at once;
2. waiting requests are admitted while rows are free: each prompt is prefilled on its own through
   transformers' layers into its row, in forwards of at most the memory plan's ``prefill_chunk``
   tokens (the activations the plan reserves; ``moerun serve`` loads with one prompt's worth), and
   its first token is sampled (while other sequences are decoding, prompts are admitted only until
   ``max_prefill_tokens`` prompt tokens have been prefilled in this iteration, so their next token
   is not held up by a queue of long prompts);
3. one decode step for every running sequence together: the fast decode path's step
   (``FastDecoder.step``, CUDA graphs over the rows, with per-row ``position_ids`` and a per-row 4-D
   mask) or, with the fast path off, transformers' layers over the same rows;
4. each sequence's token is sampled under its own settings (sampling.py) and handed to its
   ``on_event`` callback; a sequence that finished (a stop token or string, ``max_tokens``) frees its
   row, and the last row's sequence moves into it (its KV positions are copied), so the running
   sequences always fill rows ``0..n-1`` and a step computes nothing for empty rows.

A greedy request gets the tokens ``model.generate(do_sample=False)`` gives it alone: its row sees
only its own positions, and every operation of a step is row-wise.

The waiting queue is bounded: a request that finds ``max_queue`` requests waiting beyond the free
rows is refused at once (:class:`QueueFull`, counted as "rejected") rather than queued.

Threads: the model runs on the engine's one thread (:meth:`start`), each iteration under the
model's lock (so ``model.moerun.stats()`` from another thread sees whole steps); :meth:`submit` and
:meth:`cancel` may be called from any thread; ``on_event`` runs on the engine's thread and must not
block. While the engine serves, it owns the model's KV cache: a ``generate()`` on the same model
takes it back, and the requests in flight then end with an error.

This module knows nothing about text beyond the optional per-request ``TextStream`` it feeds, and
nothing about HTTP.
"""
from __future__ import annotations

import collections
import itertools
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..runtime.decode_cache import masks_by_kind
from ..runtime.generate_hooks import forward_in_chunks
from ..runtime.row_cache import RowCache
from .sampling import SamplingParams, TokenLogprob, sample
from .text_stream import TextStream

DEFAULT_MAX_PREFILL_TOKENS = 512
DEFAULT_MAX_QUEUE = 256
FINISH_REASONS = ("stop", "length", "cancelled", "error")  # Event.finish_reason, when set


class RequestError(ValueError):
    """A request the engine cannot serve; ``param`` names the offending field (the message says what
    is wrong and what would work)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests beyond the free rows: the request was not taken
    (nothing of it was queued); the client may try again later."""


class ConsumerGone(Exception):
    """Raised by an ``on_event`` callback whose consumer has gone: the request ends quietly (a callback
    raising anything else ends it too, with its traceback printed)."""


@dataclass(frozen=True)
class Event:
    """What happened to a request in one iteration: a new token (``token_id``; None in an event that
    only ends the request), the text to show now (always "" without a TextStream), the token's
    log-probabilities when asked for, and ``finish_reason`` (one of :data:`FINISH_REASONS`) in the
    request's last event, with ``error`` when it is "error"."""

    token_id: int | None
    text: str = ""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    """One sequence to generate: ``prompt`` token ids, at most ``max_tokens`` new tokens (None: as many as
    fit in ``max_context``), its sampling
    settings, extra stop token ids (the model's end-of-sequence ids stop it too unless ``ignore_eos``),
    an optional :class:`TextStream` (text and stop strings), and ``on_event``, called with each
    :class:`Event` on the engine's thread."""

    prompt: list[int]
    max_tokens: int | None
    on_event: Callable[[Event], None]
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    text: TextStream | None = None


@dataclass
class _Sequence:
    """A request with a row: ``length`` positions of its row hold KV, ``next_token`` is the sampled
    token the next decode step feeds (not yet in the cache)."""

    id: int
    request: Request
    max_tokens: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    length: int = 0
    next_token: int = -1
    generated: int = 0


class BatchingEngine:
    """Continuous batching over one model's KV-cache rows (module docstring)."""

    def __init__(self, model, *, max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        handle = model.moerun
        self._model = model
        self._handle = handle
        self._decoder = handle.decoder
        self.max_batch = self._decoder.cache.max_batch
        self.max_context = self._decoder.cache.max_context
        # Tokens of one prefill forward: the activations the memory plan reserves (a prompt is prefilled alone).
        self.prefill_chunk = handle.plan.prefill_chunk
        self.vocab_size = model.config.vocab_size
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue  # requests that may wait beyond the free rows
        if self._decoder.cache_arg is None:
            raise RuntimeError(f"the serving engine cannot pass a KV cache to this model: "
                               f"{self._decoder.off_reason}")
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            raise RuntimeError(f"attention implementation {impl!r}: the serving engine builds per-row masks for "
                               "'sdpa' or 'eager' attention; load the model with one of them")
        dtype, device = self._decoder.dtype, self._decoder.device
        # The per-row 4-D mask in the form transformers' attention takes: bool for sdpa, additive for eager.
        if impl == "sdpa":
            self._open, self._closed, mask_dtype = True, False, torch.bool
        else:
            self._open, self._closed, mask_dtype = 0.0, torch.finfo(dtype).min, dtype
        self._mask = torch.full((self.max_batch, 1, 1, self.max_context), self._closed, dtype=mask_dtype,
                                device=device)  # [max_batch, 1, 1, L] which positions each row sees
        self.eos_token_ids = _eos_ids(model)
        self._cache: RowCache | None = None
        self._rows: list[_Sequence] = []  # row r holds self._rows[r]
        self._prefilling: _Sequence | None = None  # out of the queue, not yet in self._rows
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counts = {"submitted": 0, "prefills": 0, "prompt_tokens": 0, "generated_tokens": 0,
                        "decode_steps": 0, "rejected": 0, "finished": dict.fromkeys(FINISH_REASONS, 0)}

    # -- any thread --------------------------------------------------------------------------------
    def check(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """``max_tokens`` for a prompt of ``prompt_tokens`` (None: all the room left in its row);
        RequestError when the two do not fit ``max_context``."""
        room = self.max_context - prompt_tokens
        if prompt_tokens < 1:
            raise RequestError("the prompt is empty (no tokens); give at least one token", "prompt")
        if room < 1:
            raise RequestError(
                f"this model's maximum context length is {self.max_context} tokens, but the prompt has "
                f"{prompt_tokens} tokens (at least one new token must fit); shorten the prompt, or start "
                "the server with a larger --max-context", "messages/prompt")
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            raise RequestError(
                f"this model's maximum context length is {self.max_context} tokens; the prompt has {prompt_tokens} "
                f"tokens, so at most {room} new tokens fit, but max_tokens is {max_tokens}; ask for fewer (or none: "
                "the rest of the context)", "max_tokens")
        return max_tokens

    def check_queue(self, count: int = 1) -> None:
        """Raise :class:`QueueFull` (and count the refusal) unless ``count`` more requests fit the
        waiting queue now; a caller checks before any work on the requests (tokenization)."""
        with self._lock:
            self._check_queue_locked(count)

    def _check_queue_locked(self, count: int) -> None:
        free_rows = self.max_batch - len(self._rows) - (self._prefilling is not None)
        if len(self._waiting) + count > free_rows + self.max_queue:
            self._counts["rejected"] += 1
            raise QueueFull(f"the server is overloaded: {len(self._waiting)} requests are waiting for one of "
                            f"{self.max_batch} rows (--max-queue {self.max_queue}); try again later")

    def submit(self, request: Request) -> int:
        """Queue ``request``; returns its id (for :meth:`cancel`). RequestError when it cannot be served,
        :class:`QueueFull` when the waiting queue is full."""
        max_tokens = self.check(len(request.prompt), request.max_tokens)
        bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside this model's vocabulary (0..{self.vocab_size - 1})",
                               "prompt")
        stop_ids = request.stop_token_ids if request.ignore_eos else request.stop_token_ids | self.eos_token_ids
        with self._lock:
            if self._stopping:
                raise RuntimeError("the serving engine is shutting down and takes no new requests")
            self._check_queue_locked(1)
            seq = _Sequence(next(self._ids), request, max_tokens, frozenset(stop_ids), request.sampling.generator())
            self._waiting.append(seq)
            self._counts["submitted"] += 1
            self._lock.notify()
        return seq.id

    def cancel(self, request_id: int) -> None:
        """End a request at the next iteration (its row is freed); it gets a "cancelled" event. A
        request already finished is left alone."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def stats(self) -> dict:
        """Rows, running and waiting sequences (the queue), and counters since the engine was made
        ("rejected": requests refused because the queue was full)."""
        with self._lock:
            counts = {**self._counts, "finished": dict(self._counts["finished"])}
            return {"max_batch": self.max_batch, "max_context": self.max_context, "running": len(self._rows),
                    "waiting": len(self._waiting), "max_queue": self.max_queue, "max_prefill_tokens": self.max_prefill_tokens,
                    "prefill_chunk": self.prefill_chunk,
                    "decode_path": "fast" if self._decoder.enabled else "transformers", **counts}

    def idle(self) -> bool:
        """Nothing running, waiting or to cancel."""
        with self._lock:
            return not (self._rows or self._waiting or self._cancelled)

    # -- the engine's thread -----------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine on its own thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("the serving engine is already running")
        self._thread = threading.Thread(target=self._loop, name="moerun-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the engine's thread after its current iteration; requests still in flight are cancelled
        (each gets its "cancelled" event)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the serving engine's thread did not stop within {timeout} s")
            self._thread = None
        with self._lock:
            leftover, self._waiting = list(self._waiting) + self._rows, collections.deque()
            self._rows = []
        for seq in leftover:
            self._finish(seq, Event(None, finish_reason="cancelled"))

    def _loop(self) -> None:
        if self._decoder.device.type == "cuda":
            torch.cuda.set_device(self._decoder.device)  # a new thread starts on device 0
        while True:
            with self._lock:
                while not self._stopping and not (self._rows or self._waiting or self._cancelled):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the thread must go on, and nobody may wait forever
                self._fail_all(exc)

    @torch.no_grad()
    def step(self) -> bool:
        """One iteration (module docstring); returns whether there was anything to do. The engine's
        thread calls it; tests may call it directly instead of :meth:`start`."""
        with self._handle.lock:
            self._apply_cancellations()
            if not (self._rows or self._waiting):
                return False
            self._take_cache()
            self._admit()
            if self._rows:
                try:
                    self._decode()
                except Exception as exc:  # noqa: BLE001 - every running request must hear of it
                    self._fail_running(exc)
            return True

    # -- one iteration -----------------------------------------------------------------------------
    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [s for s in self._waiting if s.id in cancelled]
            self._waiting = collections.deque(s for s in self._waiting if s.id not in cancelled)
        for seq in dropped:
            self._finish(seq, Event(None, finish_reason="cancelled"))
        for row in sorted((r for r, s in enumerate(self._rows) if s.id in cancelled), reverse=True):
            seq = self._rows[row]
            self._release(row)
            self._finish(seq, Event(None, finish_reason="cancelled"))

    def _take_cache(self) -> None:
        """The model's KV cache as rows; a generate() on the model since the last step took it back,
        which loses what the rows held."""
        if self._cache is not None and self._decoder.cache.cache is self._cache:
            return
        if self._cache is not None:
            self._fail_running(RuntimeError(
                "model.generate() ran on this model while it was serving and took its KV cache; requests in "
                "flight were lost (serve and call generate() on separately loaded models)"))
        self._cache = self._decoder.start_rows()
        self._mask.fill_(self._closed)

    def _admit(self) -> None:
        decoding, prefilled = bool(self._rows), 0
        while len(self._rows) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                seq = self._waiting[0]
                if decoding and prefilled and prefilled + len(seq.request.prompt) > self.max_prefill_tokens:
                    return
                self._waiting.popleft()
                self._prefilling = seq
            prefilled += len(seq.request.prompt)
            try:
                logits = self._prefill(seq, row=len(self._rows))  # [1, V]
                tokens, logprobs = sample(logits, [seq.request.sampling], [seq.generator])
            except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
                self._prefilling = None
                self._finish(seq, _error_event(exc))
                continue
            self._rows.append(seq)
            self._prefilling = None
            self._counts["prefills"] += 1
            self._counts["prompt_tokens"] += len(seq.request.prompt)
            if self._emit(seq, tokens[0], logprobs[0]):
                self._release(len(self._rows) - 1)

    def _prefill(self, seq: _Sequence, row: int) -> torch.Tensor:
        """The prompt through transformers' layers into ``row``; the last position's logits ``[1, V]``. A prompt
        of more than ``prefill_chunk`` tokens runs as forwards of that many (generate_hooks.forward_in_chunks
        splits the tokens, positions and kept logits; each chunk here gets its rows' span of the cache and its
        mask): each chunk's tokens see the row's earlier positions and themselves, as one forward's would."""
        device, prompt, cache_arg = self._decoder.device, seq.request.prompt, self._decoder.cache_arg
        t = len(prompt)
        ids = torch.tensor([prompt], device=device)  # [1, T]
        positions = torch.arange(t, device=device)[None]  # [1, T]
        written = 0  # positions of the row the chunks before this one wrote (they run in order)

        def forward(*, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs):
            nonlocal written
            start, end = written, written + input_ids.shape[1]
            written = end
            # Query i (position start + i) sees keys 0..start + i.
            causal = torch.ones(end - start, end, dtype=torch.bool, device=device).tril(start)  # [Q, end]
            mask = torch.where(causal, self._open, self._closed).to(self._mask.dtype)[None, None]  # [1, 1, Q, end]
            kwargs[cache_arg] = self._cache.span(row, position_ids, end)
            return self._model(input_ids=input_ids, position_ids=position_ids, use_cache=True,
                               attention_mask=masks_by_kind(self._model.config, mask, position_ids), **kwargs)

        # The whole prompt's span: what forward_in_chunks reads the cache's length from (0: an empty row).
        whole = {"input_ids": ids, "position_ids": positions, "logits_to_keep": 1,
                 cache_arg: self._cache.span(row, positions, t)}
        if t <= self.prefill_chunk:
            out = forward(**whole)
        else:
            out = forward_in_chunks(forward, cache_arg, self.prefill_chunk, whole)
        self._mask[row].fill_(self._closed)
        self._mask[row, ..., :t] = self._open
        seq.length = t
        return out.logits[:, -1]

    def _decode(self) -> None:
        """One decode step of every running sequence, then their tokens."""
        rows, device = self._rows, self._decoder.device
        n = len(rows)
        ids = torch.tensor([[s.next_token] for s in rows], device=device)  # [n, 1]
        lengths = [s.length for s in rows]
        positions = torch.tensor(lengths, device=device)  # [n] where each row writes its token
        self._mask[:n, 0, 0].scatter_(1, positions[:, None], self._open)  # each new token sees itself
        cache_arg = self._decoder.cache_arg
        if self._decoder.enabled:
            self._cache.write_positions[:n].copy_(positions)
            out = self._decoder.step(input_ids=ids, position_ids=positions[:, None], attention_mask=self._mask[:n],
                                     logits_to_keep=1, **{cache_arg: self._cache})
        else:
            end = max(lengths) + 1
            span = self._cache.span(0, positions[:, None], end)
            mask = masks_by_kind(self._model.config, self._mask[:n, ..., :end], positions[:, None])
            out = self._model(input_ids=ids, position_ids=positions[:, None], attention_mask=mask,
                              use_cache=True, logits_to_keep=1, **{cache_arg: span})
        for seq in rows:
            seq.length += 1
        self._counts["decode_steps"] += 1
        tokens, logprobs = sample(out.logits[:, -1], [s.request.sampling for s in rows], [s.generator for s in rows])
        finished = [row for row, seq in enumerate(rows) if self._emit(seq, tokens[row], logprobs[row])]
        for row in reversed(finished):
            self._release(row)

    def _emit(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Hand ``seq`` its new token; returns whether the sequence is finished."""
        seq.generated += 1
        seq.next_token = token
        self._counts["generated_tokens"] += 1
        stream, text, reason = seq.request.text, "", None
        if token in seq.stop_ids:
            reason = "stop"
        elif stream is not None:
            text = stream.add(token)
            reason = "stop" if stream.stopped else None
        if reason is None and seq.generated >= seq.max_tokens:
            reason = "length"
        if reason is not None and stream is not None:
            text += stream.finish()  # held-back text that turned out to be no stop string
        event = Event(token, text, logprob, reason)
        if reason is not None:
            self._finish(seq, event)
            return True
        if not self._deliver(seq, event):
            return True
        return False

    def _release(self, row: int) -> None:
        """Free ``row``: the last row's sequence moves into it (rows stay 0..n-1)."""
        last = len(self._rows) - 1
        if row != last:
            moved = self._rows[last]
            self._cache.move_row(last, row, moved.length)
            self._mask[row].copy_(self._mask[last])
            self._rows[row] = moved
        self._rows.pop()

    def _fail_all(self, exc: BaseException) -> None:
        """An iteration failed outside a request's own prefill or step: every request in flight ends with
        the error (a failure to take the KV cache, say, would otherwise leave them all waiting)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        self._fail_running(exc)
        event = _error_event(exc)
        for seq in waiting:
            self._finish(seq, event)

    def _fail_running(self, exc: BaseException) -> None:
        """A decode step failed: every running sequence ends with the error (their rows' state is unknown)."""
        failed, self._rows = self._rows, []
        event = _error_event(exc)
        for seq in failed:
            self._finish(seq, event)

    def _finish(self, seq: _Sequence, event: Event) -> None:
        with self._lock:
            self._counts["finished"][event.finish_reason] += 1
        self._deliver(seq, event)

    def _deliver(self, seq: _Sequence, event: Event) -> bool:
        """Call the request's ``on_event``; a callback that raises cancels its request (False)."""
        try:
            seq.request.on_event(event)
            return True
        except Exception as exc:  # noqa: BLE001 - one broken consumer must not stop the others' steps
            if not isinstance(exc, ConsumerGone):
                traceback.print_exc()
            if event.finish_reason is None:
                with self._lock:
                    self._counts["finished"]["cancelled"] += 1
            return False


def _error_event(exc: BaseException) -> Event:
    return Event(None, finish_reason="error", error=f"{type(exc).__name__}: {exc}")


def _eos_ids(model) -> frozenset[int]:
    """The model's end-of-sequence token ids (generation config first, as generate() takes them)."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()
