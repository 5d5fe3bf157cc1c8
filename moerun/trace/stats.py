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
            trans = np.zeros((E, E), np.int64)
            for k1 in range(K):
                for k2 in range(K):
                    np.add.at(trans, (ids[:, k1], nxt[:, k2]), 1)
            best = trans.argmax(axis=1)                                     # [E] best guess after e
            guesses = best[ids]                                             # [N, K]
            hit = (guesses[:, :, None] == nxt[:, None, :]).any(axis=2)
            pred = float(hit.mean())
        overlap = float((ids[1:, :, None] == ids[:-1, None, :]).any(-1).mean()) if len(ids) > 1 else float("nan")
        out.append(dict(layer=l, entropy_bits=entropy, max_entropy_bits=float(np.log2(E)), skew_top10=skew,
                        reuse_distance_median=reuse, next_layer_predictability=pred, prev_token_overlap=overlap))
    return out


def format_table(rows: list[dict]) -> str:
    """The per-layer stats as an aligned text table."""
    head = f"{'layer':>5} {'entropy':>8} {'skew10%':>8} {'reuse':>7} {'next-pred':>9} {'prev-tok':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['layer']:>5} {r['entropy_bits']:>8.3f} {r['skew_top10']:>8.3f} "
                     f"{r['reuse_distance_median']:>7.1f} {r['next_layer_predictability']:>9.3f} "
                     f"{r['prev_token_overlap']:>8.3f}")
    return "\n".join(lines)
