"""The static KV cache moerun owns for the fast decode path.

A transformers ``StaticCache`` of ``max_context`` positions (so prefill runs through transformers'
own code and writes into it, and the attention modules captured in the decode graphs update it in
place through its device-side length), for one batch size at a time: a generate() call with another
batch size replaces it, so the cache never holds more than the ``max_batch x max_context`` tokens
the memory plan reserves. The host keeps its own count of the tokens written, so checking that a
step fits needs no device read; a step that would run past ``max_context`` raises
:class:`ContextOverflowError` before anything is written.

This module knows nothing about graphs or experts.
"""
from __future__ import annotations

from transformers import StaticCache


class ContextOverflowError(ValueError):
    """A forward would write past the static KV cache's ``max_context`` positions."""


class DecodeCache:
    """The active static cache, its batch size, and the host-side count of tokens written."""

    def __init__(self, config, max_context: int, max_batch: int):
        self.config = config
        self.max_context = max_context
        self.max_batch = max_batch
        self.cache: StaticCache | None = None
        self.batch_size = 0
        self.length = 0  # tokens written per sequence (prefill + decode steps)

    def fits(self, batch_size: int) -> bool:
        """Whether a batch of ``batch_size`` sequences fits the reserved KV memory."""
        return 1 <= batch_size <= self.max_batch

    def start(self, batch_size: int) -> tuple[StaticCache, bool]:
        """An empty cache for a new generation of ``batch_size`` sequences.

        Returns ``(cache, replaced)``: ``replaced`` is True when the batch size changed and the
        previous cache (and whatever was built over it) is gone.
        """
        if not self.fits(batch_size):
            raise ValueError(f"batch size {batch_size} is outside 1..max_batch={self.max_batch}")
        replaced = self.cache is None or batch_size != self.batch_size
        if replaced:
            self.cache = None  # free the old tensors before the new ones are allocated
            self.cache = StaticCache(config=self.config, max_cache_len=self.max_context)
            self.batch_size = batch_size
        else:
            self.cache.reset()  # in place: tensors (and graphs captured over them) stay valid
        self.length = 0
        return self.cache, replaced

    def owns(self, past_key_values) -> bool:
        return past_key_values is not None and past_key_values is self.cache

    def advance(self, new_tokens: int) -> None:
        """Account for a forward that writes ``new_tokens`` positions per sequence; raise first
        if they do not fit."""
        if self.length + new_tokens > self.max_context:
            raise ContextOverflowError(
                f"this step would write KV positions {self.length}..{self.length + new_tokens - 1}, but "
                f"moerun's static KV cache holds max_context={self.max_context} tokens per sequence "
                "(prompt + generated). Load the model with a larger max_context "
                "(moerun.load(..., max_context=N); the KV reserve grows with it), shorten the prompt or "
                "max_new_tokens, or turn the fast path off (model.moerun.fast_decode = False)."
            )
        self.length += new_tokens

    def nbytes(self) -> int:
        """Bytes of the key/value tensors allocated so far (they are allocated by the first prefill)."""
        if self.cache is None:
            return 0
        total = 0
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total
