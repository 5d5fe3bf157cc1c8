"""A static KV cache whose rows hold independent sequences, each at its own position.

transformers' ``StaticCache`` writes one position for the whole batch (every sequence started
together). Continuous batching (moerun.serve) needs each row of the cache to be a sequence of its own:
rows join and leave between decode steps, so in one step row 0 writes position 812 and row 3
position 5. :class:`RowCache` holds ``max_batch`` rows of ``max_context`` positions per decoder layer
(the KV memory the plan reserves) and writes every row at its own position:

- inside a fast-path decode step (moerun.runtime.fast_decode) it is the cache itself: a step of
  ``n`` sequences covers rows ``0..n-1`` and writes row ``r``'s new token at ``write_positions[r]``,
  a device tensor, so the captured graphs replay with whatever positions the next step sets;
- on transformers' layers (a prompt's prefill, or decode with the fast path off) a :class:`RowSpan`
  stands for some rows, with their write positions, and hands attention only the positions written
  so far.

Each layer's keys and values are ``[max_batch, kv_heads, max_context, head_dim]`` (allocated by the first
write, with the shapes and dtype the attention gives); attention reads a view of the rows it covers,
and the caller's 4-D mask hides every position a row has not written. The caller keeps the rows
compact (:meth:`move_row`) and knows each row's length; this module keeps no per-sequence state and
knows nothing about graphs, experts or sampling.
"""
from __future__ import annotations

import torch


class RowCache:
    """``max_batch`` rows of ``max_context`` KV positions per decoder layer (module docstring)."""

    def __init__(self, num_layers: int, max_batch: int, max_context: int, device: torch.device):
        self.num_layers, self.max_batch, self.max_context = num_layers, max_batch, max_context
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [max_batch, heads, max_context, Dk]
        self.values: list[torch.Tensor | None] = [None] * num_layers  # [max_batch, heads, max_context, Dv]
        # Where each row writes the next token of a fast-path step; read on the device (graphs replay it).
        self.write_positions = torch.zeros(max_batch, dtype=torch.long, device=device)  # [max_batch]
        self._rows = torch.arange(max_batch, device=device)  # [max_batch]
        self._offsets = torch.arange(max_context, device=device)  # [max_context] token offsets in a step

    def _layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.keys[layer_idx] is None:
            _, heads, _, k_dim = key_states.shape
            self.keys[layer_idx] = torch.zeros(self.max_batch, heads, self.max_context, k_dim,
                                               dtype=key_states.dtype, device=key_states.device)
            self.values[layer_idx] = torch.zeros(self.max_batch, value_states.shape[1], self.max_context,
                                                 value_states.shape[-1], dtype=value_states.dtype,
                                                 device=value_states.device)
        return self.keys[layer_idx], self.values[layer_idx]

    def write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, first_row: int,
              positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` ``[n, heads, Q, D]`` into rows ``first_row..first_row+n-1``
        at ``positions`` ``[n, Q]`` (device ops only); returns the layer's keys and values of those rows,
        every position (``[n, heads, max_context, D]`` views)."""
        keys, values = self._layer(layer_idx, key_states, value_states)
        n = key_states.shape[0]
        rows = self._rows[first_row:first_row + n, None]  # [n, 1]
        keys[rows, :, positions] = key_states.transpose(1, 2)  # [n, Q, heads, Dk] into [n, Q] places
        values[rows, :, positions] = value_states.transpose(1, 2)
        return keys[first_row:first_row + n], values[first_row:first_row + n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The attention's call inside a fast-path step over rows ``0..n-1``: each row's ``Q`` new tokens
        go to ``write_positions[row]`` onwards."""
        n, q = key_states.shape[0], key_states.shape[2]
        positions = self.write_positions[:n, None] + self._offsets[:q]  # [n, Q]
        return self.write(layer_idx, key_states, value_states, 0, positions)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions of every layer to row ``dst`` (a sequence moves
        to fill the row a finished one left)."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                if t is not None and length > 0:
                    t[dst, :, :length].copy_(t[src, :, :length])

    def span(self, first_row: int, positions: torch.Tensor, end: int) -> "RowSpan":
        """Rows ``first_row..first_row+n-1`` as the KV cache of one forward through transformers' layers:
        ``positions`` ``[n, Q]`` (device) are where each row writes, ``end`` (host) one past the last of them."""
        return RowSpan(self, first_row, positions, end)

    def nbytes(self) -> int:
        """Bytes of the key/value tensors allocated so far (the first write allocates a layer's)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class RowSpan:
    """Some consecutive rows of a :class:`RowCache` as the KV cache of one forward through transformers'
    layers: writes go to the rows' ``positions``; attention gets the positions up to the last one written
    (the caller's mask is ``[n, 1, Q, end]``, ``end``: one past the last position written)."""

    def __init__(self, rows: RowCache, first_row: int, positions: torch.Tensor, end: int):
        if not 0 < end <= rows.max_context:
            raise ValueError(f"a row span ending at position {end} does not fit max_context={rows.max_context}")
        self.rows, self.first_row, self.positions = rows, first_row, positions  # positions [n, Q] on the device
        self.end = end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.rows.write(layer_idx, key_states, value_states, self.first_row, self.positions)
        return keys[:, :, :self.end], values[:, :, :self.end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions the longest of the rows held before this forward (each row writes Q tokens, so the
        row ending last began last): what a max_context check and a trace's prompt marker ask a cache."""
        return self.end - self.positions.shape[1]
