"""Routing statistics of a trace: what a cache policy could exploit, layer by layer.

- entropy_bits: entropy of the layer's expert distribution (log2 E = uniform).
- skew_top10: share of the layer's accesses that go to its top 10% experts.
- reuse_distance_median: median number of the layer's accesses between two uses of an expert.
- next_layer_predictability: how often a token's expert at layer l+1 is the one most often seen
  after its layer-l experts (the best single-guess accuracy of an affinity table, in-sample).
- prev_token_overlap: share of a token's experts at the layer that the token before it (in trace
  order) also used there: what a cache of only the last step's experts would hit.
"""
from __future__ import annotations

import numpy as np

from moerun.trace.format import Trace


def layer_stats(trace: Trace) -> list[dict]:
    """One dict per MoE layer (keys as in the module docstring)."""
    E, K = trace.num_experts, trace.top_k
    out = []
    for l in range(trace.num_layers):
        ids = trace.expert_ids[:, l, :]                                     # [N, K]
        counts = np.bincount(ids.ravel(), minlength=E).astype(np.float64)   # [E]
        p = counts / max(counts.sum(), 1)
        nz = p[p > 0]
        entropy = float(-(nz * np.log2(nz)).sum())
        top = max(1, E // 10)
        skew = float(np.sort(p)[::-1][:top].sum())
        flat = ids.ravel()
        last = np.full(E, -1, np.int64)
        dists = []
        for i, e in enumerate(flat):
            if last[e] >= 0:
                dists.append(i - last[e])
            last[e] = i
        reuse = float(np.median(dists)) if dists else float("nan")
        pred = float("nan")
        if l + 1 < trace.num_layers:
            nxt = trace.expert_ids[:, l + 1, :]
            guesses = _best_next(ids, nxt, E)[ids]                          # [N, K]
            hit = (guesses[:, :, None] == nxt[:, None, :]).any(axis=2)
            pred = float(hit.mean())
        overlap = float((ids[1:, :, None] == ids[:-1, None, :]).any(-1).mean()) if len(ids) > 1 else float("nan")
        out.append(dict(layer=l, entropy_bits=entropy, max_entropy_bits=float(np.log2(E)), skew_top10=skew,
                        reuse_distance_median=reuse, next_layer_predictability=pred, prev_token_overlap=overlap))
    return out


def _best_next(ids: np.ndarray, nxt: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E]``: for each expert e, the expert most often routed at the next layer by tokens that
    routed e here (ties to the lowest id; 0 for an expert never routed). Counted over the pairs
    that occur, not an E x E table."""
    codes = (ids[:, :, None].astype(np.int64) * num_experts + nxt[:, None, :]).ravel()  # [N*K*K] e*E + f
    pairs, counts = np.unique(codes, return_counts=True)
    src, dst = np.divmod(pairs, num_experts)
    order = np.lexsort((dst, -counts, src))                                # by e, then count down, then f
    first = np.ones(order.size, bool)
    first[1:] = src[order][1:] != src[order][:-1]
    best = np.zeros(num_experts, np.int64)
    best[src[order][first]] = dst[order][first]
    return best


# (key, column header, width, decimals, meaning): the table's columns, explained under it.
COLUMNS = (
    ("entropy_bits", "entropy", 8, 3, "bits of the layer's expert distribution (max log2 E)"),
    ("skew_top10", "skew10%", 8, 3, "share of accesses to the layer's top 10% experts"),
    ("reuse_distance_median", "reuse", 7, 1, "median accesses between two uses of an expert"),
    ("next_layer_predictability", "next-pred", 9, 3,
     "share of tokens whose next-layer experts include the one most often seen after theirs here "
     "(the last layer has no next: -)"),
    ("prev_token_overlap", "prev-tok", 8, 3, "share of a token's experts the token before also used"),
)


def format_table(rows: list[dict]) -> str:
    """The per-layer stats as an aligned text table, with what each column means under it ("-":
    undefined, such as the last layer's next-layer predictability)."""
    lines = [f"{'layer':>5} " + " ".join(f"{head:>{width}}" for _, head, width, _, _ in COLUMNS)]
    for r in rows:
        cells = [f"{'-':>{width}}" if np.isnan(r[key]) else f"{r[key]:>{width}.{decimals}f}"
                 for key, _, width, decimals, _ in COLUMNS]
        lines.append(f"{r['layer']:>5} " + " ".join(cells))
    lines.append("")
    lines += [f"  {head:<9} {meaning}" for _, head, _, _, meaning in COLUMNS]
    return "\n".join(lines)
