"""The static KV cache moerun owns for the fast decode path.

A transformers ``StaticCache`` of ``max_context`` positions (so prefill runs through transformers'
own code and writes into it, and the attention modules captured in the decode graphs update it in
place through its device-side length), for one batch size at a time: a generate() call with another
batch size replaces it, so the cache never holds more than the ``max_batch x max_context`` tokens
the memory plan reserves. The serving engine (moerun.serve) takes the same reserve as a
``row_cache.RowCache`` of ``max_batch`` rows, each row a sequence at its own position
(:meth:`DecodeCache.start_rows`); either replaces the other. The host keeps its own count of the
tokens written, so checking that a step fits needs no device read; a step that would run past
``max_context`` raises :class:`ContextOverflowError` before anything is written.

This module knows nothing about graphs or experts.
"""
from __future__ import annotations

import torch
from transformers import StaticCache

from .row_cache import RowCache


class ContextOverflowError(ValueError):
    """A forward would write past the static KV cache's ``max_context`` positions."""


class DecodeCache:
    """The active static cache, its batch size, and the host-side count of tokens written."""

    def __init__(self, config, max_context: int, max_batch: int):
        self.config = config
        self.max_context = max_context
        self.max_batch = max_batch
        self.cache: StaticCache | RowCache | None = None
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
        replaced = self.cache is None or batch_size != self.batch_size or isinstance(self.cache, RowCache)
        if replaced:
            self.cache = None  # free the old tensors before the new ones are allocated
            self.cache = StaticCache(config=self.config, max_cache_len=self.max_context)
            self.batch_size = batch_size
        else:
            self.cache.reset()  # in place: tensors (and graphs captured over them) stay valid
        self.length = 0
        return self.cache, replaced

    def start_rows(self, device: torch.device) -> tuple[RowCache, bool]:
        """The serving engine's cache: ``max_batch`` rows, each holding a sequence at its own position
        (row_cache). Returns ``(cache, replaced)`` as :meth:`start` does; an existing row cache is kept
        as it is (the engine tracks what its rows hold)."""
        replaced = not isinstance(self.cache, RowCache)
        if replaced:
            self.cache = None  # free the old tensors before the new ones are allocated
            self.cache = RowCache(self.config.num_hidden_layers, self.max_batch, self.max_context, device)
            self.batch_size = self.max_batch
        self.length = 0  # per-row lengths are the engine's; this count serves generate() only
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
        if isinstance(self.cache, RowCache):
            return self.cache.nbytes()
        total = 0
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False):
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total


class DecodeMask:
    """generate()'s 4-D attention mask over the static cache, extended by one column per decode step.

    For a static cache transformers' generate() rebuilds the whole ``[B, 1, 1, L]`` mask from the 2-D
    padding mask before every decode step (``create_masks_for_generate``: a few hundred microseconds of
    Python with the GPU idle, a tenth of a fast-path step). A one-token step at position ``p`` differs
    from the step before only in column ``p``, which is the 2-D mask's newest column (generate()
    appends it), so after transformers built one decode mask this keeps a copy and writes that column
    on the device. Anything else (prefill, several tokens, a mask that does not continue the last
    one, another cache) goes to transformers' function, which starts a new copy.
    """

    def __init__(self, cache: DecodeCache, cache_arg: str | None):
        self.cache = cache
        self.cache_arg = cache_arg  # the KV cache's argument name in this transformers (transformers_contract)
        self._mask: torch.Tensor | None = None  # [B, 1, 1, L] the last decode step's mask (our copy)
        self._key: str | None = None  # transformers returned {key: mask} (layer types) rather than a mask
        self._columns = 0  # 2-D mask length (positions seen) of that step

    def reset(self) -> None:
        self._mask, self._columns = None, 0

    def build(self, original, *args, **kwargs):
        """``create_masks_for_generate``'s result for these arguments: extended from the last step's
        when it continues it, else ``original(*args, **kwargs)`` (remembered when it is a decode mask)."""
        pad, tokens, cache = kwargs.get("attention_mask"), _query_length(kwargs), kwargs.get(self.cache_arg)
        padded = isinstance(pad, torch.Tensor) and pad.dim() == 2
        decode = not args and tokens == 1 and self.cache.owns(cache) and (pad is None or padded)
        # Positions the step's token sees, itself included (the 2-D mask's length when there is one).
        columns = pad.shape[1] if padded else self.cache.length + 1
        mask = self._mask
        if (decode and mask is not None and columns == self._columns + 1 and self.cache.length == columns - 1
                and columns <= mask.shape[-1] and (pad is None or pad.shape[0] == mask.shape[0])):
            col = mask[:, 0, 0, columns - 1]  # [B] the new token's own column
            if pad is None:  # no padding: the token attends to itself
                col.fill_(True if mask.dtype == torch.bool else 0.0)
            elif mask.dtype == torch.bool:
                col.copy_(pad[:, columns - 1] != 0)
            else:  # additive: transformers' 0 where attending, the dtype's minimum elsewhere
                col.copy_(torch.where(pad[:, columns - 1] != 0, 0.0, torch.finfo(mask.dtype).min))
            self._columns = columns
            return {self._key: mask} if self._key is not None else mask
        out = original(*args, **kwargs)
        self._mask = None
        if decode:
            key = next(iter(out)) if isinstance(out, dict) and len(out) == 1 else None
            built = out[key] if key is not None else out
            if isinstance(built, torch.Tensor) and built.dim() == 4 and built.shape[2] == 1:
                self._mask, self._key, self._columns = built.contiguous().clone(), key, columns
        return out


def _query_length(kwargs) -> int | None:
    embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))  # the name changed across versions
    return embeds.shape[1] if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2 else None
