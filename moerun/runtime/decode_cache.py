"""The static KV cache moerun owns for the fast decode path.

A transformers ``StaticCache`` of ``max_context`` positions (so prefill runs through transformers'
own code and writes into it, and the attention modules captured in the decode graphs update it in
place through its device-side length), for one batch size at a time. Sliding-window layers (gpt-oss)
are held at full length too: transformers' ``StaticSlidingWindowLayer`` rolls its window under
host-side control flow (a Python count of the tokens written) that a replayed graph cannot follow,
while a full-length layer behind a sliding-window mask attends to exactly the same positions (the
window is the mask's: :func:`sliding_window_mask`, and :class:`DecodeMask` extends both kinds). a generate() call with another
batch size replaces it, so the cache never holds more than the ``max_batch x max_context`` tokens
the memory plan reserves. The serving engine (moerun.serve) takes the same reserve as a
``row_cache.RowCache`` of ``max_batch`` rows, each row a sequence at its own position
(:meth:`DecodeCache.start_rows`); either replaces the other. The host keeps its own count of the
tokens written, so checking that a step fits needs no device read; a step that would run past
``max_context`` raises :class:`ContextOverflowError` before anything is written.

This module knows nothing about graphs or experts.
"""
from __future__ import annotations

import copy

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
        # The config the StaticCache is built from: every layer a full-length one (module docstring).
        self._cache_config = config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
            self._cache_config = copy.deepcopy(config)
            self._cache_config.layer_types = ["full_attention"] * len(config.layer_types)

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
            self.cache = StaticCache(config=self._cache_config, max_cache_len=self.max_context)
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
                "(moerun.load(..., max_context=N); the KV reserve grows with it), shorten the prompt, or "
                "pass max_new_tokens so that prompt + max_new_tokens fits (the call is then checked before it "
                "starts)."
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
    """generate()'s 4-D attention masks over the static cache, extended by one column per decode step.

    For a static cache transformers' generate() rebuilds the whole ``[B, 1, 1, L]`` mask (one per layer
    type: full and sliding-window attention) from the 2-D padding mask before every decode step
    (``create_masks_for_generate``: a few hundred microseconds of Python with the GPU idle, a tenth of a
    fast-path step). A one-token step at position ``p`` differs from the step before only in column
    ``p``, which is the 2-D mask's newest column (generate() appends it), and for a sliding window of
    ``W`` in column ``p - W`` too, which leaves the window. So after transformers built one decode mask
    this keeps a copy and writes those columns on the device. Anything else (prefill, several tokens, a
    mask that does not continue the last one, another cache) goes to transformers' function, which
    starts a new copy.
    """

    def __init__(self, cache: DecodeCache, cache_arg: str | None):
        self.cache = cache
        self.cache_arg = cache_arg  # the KV cache's argument name in this transformers (transformers_contract)
        # The last decode step's masks (our copies) [B, 1, 1, L] by layer type; key None: transformers
        # returned a bare mask rather than {layer type: mask}.
        self._masks: dict[str | None, torch.Tensor] | None = None
        self._columns = 0  # 2-D mask length (positions seen) of that step

    def reset(self) -> None:
        self._masks, self._columns = None, 0

    def build(self, original, *args, **kwargs):
        """``create_masks_for_generate``'s result for these arguments: extended from the last step's
        when it continues it, else ``original(*args, **kwargs)`` (remembered when it is a decode mask)."""
        pad, tokens, cache = kwargs.get("attention_mask"), _query_length(kwargs), kwargs.get(self.cache_arg)
        padded = isinstance(pad, torch.Tensor) and pad.dim() == 2
        decode = not args and tokens == 1 and self.cache.owns(cache) and (pad is None or padded)
        # Positions the step's token sees, itself included (the 2-D mask's length when there is one).
        columns = pad.shape[1] if padded else self.cache.length + 1
        masks = self._masks
        first = next(iter(masks.values())) if masks else None
        if (decode and first is not None and columns == self._columns + 1 and self.cache.length == columns - 1
                and columns <= first.shape[-1] and (pad is None or pad.shape[0] == first.shape[0])):
            window = getattr(self.cache.config, "sliding_window", None)
            for key, mask in masks.items():
                _open_column(mask, columns - 1, pad)
                if key == "sliding_attention" and columns - 1 - window >= 0:
                    _close_column(mask, columns - 1 - window)  # the position the window leaves
            self._columns = columns
            return masks[None] if None in masks else dict(masks)
        out = original(*args, **kwargs)
        self._masks = None
        if decode:
            built = out if isinstance(out, dict) else {None: out}
            if all(isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[2] == 1 for m in built.values()):
                self._masks = {key: m.contiguous().clone() for key, m in built.items()}
                self._columns = columns
        return out


def _open_column(mask: torch.Tensor, column: int, pad: torch.Tensor | None) -> None:
    """Column ``column`` of ``mask`` [B, 1, 1, L] as the 2-D padding mask ``pad`` says (all open without one)."""
    col = mask[:, 0, 0, column]  # [B]
    if pad is None:  # no padding: the token attends to itself
        col.fill_(True if mask.dtype == torch.bool else 0.0)
    elif mask.dtype == torch.bool:
        col.copy_(pad[:, column] != 0)
    else:  # additive: transformers' 0 where attending, the dtype's minimum elsewhere
        col.copy_(torch.where(pad[:, column] != 0, 0.0, torch.finfo(mask.dtype).min))


def _close_column(mask: torch.Tensor, column: int) -> None:
    mask[:, 0, 0, column] = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def masks_by_kind(config, full: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """What a model's forward takes as ``attention_mask`` for a 4-D mask ``full`` ``[B, 1, Q, L]`` built for its
    full-attention layers: ``full`` itself, or, where ``config.layer_types`` has sliding-window layers,
    ``{"full_attention": full, "sliding_attention": ...}`` (transformers' models take such a dict as it is;
    handed one 4-D mask they would give it to every layer). ``query_positions`` ``[B, Q]``: the queries' cache
    positions."""
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return full
    return {"full_attention": full,
            "sliding_attention": sliding_window_mask(full, query_positions, config.sliding_window)}


def sliding_window_mask(full: torch.Tensor, query_positions: torch.Tensor, window: int) -> torch.Tensor:
    """The sliding-window layers' mask from the full-attention one (device ops only): ``full`` ``[B, 1, Q, L]``
    (bool, or additive with the dtype's minimum where closed) less the positions a window of ``window``
    tokens has left behind: key position ``k`` stays open for the query at cache position ``q``
    (``query_positions`` ``[B, Q]``) only while ``q - k < window``, as transformers' sliding-window
    masks define it."""
    keys = torch.arange(full.shape[-1], device=full.device)  # [L]
    inside = keys > (query_positions[:, None, :, None] - window)  # [B, 1, Q, L]
    if full.dtype == torch.bool:
        return full & inside
    return torch.where(inside, full, torch.finfo(full.dtype).min)


def _query_length(kwargs) -> int | None:
    embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))  # the name changed across versions
    return embeds.shape[1] if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2 else None
