"""Seeded synthetic routing workloads, for replay, sweeps and tests when no model trace is at hand.

Each workload draws top-k distinct experts per (token, layer) from a per-layer distribution with the
Gumbel top-k trick (exact sampling without replacement), so gate weights come out ordered like a
router's. Workloads:

- ``uniform``: every expert equally likely.
- ``zipf``: Zipf-skewed per layer; each layer has its own hot experts and its own exponent, drawn
  from ``[zipf_min, zipf_max]``, so layers differ in entropy.
- ``temporal``: zipf, plus each choice repeats the previous token's choice at that layer with
  probability ``locality``.
- ``correlated``: zipf at layer 0; at layer l+1 a token's experts follow a fixed random map of its
  layer-l experts with probability ``correlation`` (what affinity/lookahead prefetch exploits).
- ``bursty``: zipf whose hot set is re-drawn every ``phase_tokens`` tokens (phase changes).

``batch`` > 1 groups consecutive tokens into one engine step (a batched decode).
This module knows nothing about the engine.
"""
from __future__ import annotations

import numpy as np

from moerun.trace.format import Trace

WORKLOADS = ("uniform", "zipf", "temporal", "correlated", "bursty")


def _zipf_logits(rng: np.random.Generator, num_experts: int, s: float) -> np.ndarray:
    ranks = rng.permutation(num_experts) + 1
    return -s * np.log(ranks)  # log-probabilities up to a constant  # [E]


def _top_k(rng: np.random.Generator, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k distinct experts per row, sampled proportionally to exp(logits) without replacement."""
    noisy = logits + rng.gumbel(size=logits.shape)                   # [N, E]
    ids = np.argpartition(-noisy, k - 1, axis=1)[:, :k]                # [N, K]
    order = np.argsort(-np.take_along_axis(noisy, ids, 1), axis=1)
    ids = np.take_along_axis(ids, order, 1)
    chosen = np.take_along_axis(noisy, ids, 1)
    w = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    return ids.astype(np.int32), (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def synthetic_trace(workload: str, *, num_tokens: int = 1024, num_layers: int = 8, num_experts: int = 64,
                    top_k: int = 8, batch: int = 1, prompt_tokens: int = 256, seed: int = 0,
                    zipf_min: float = 0.6, zipf_max: float = 1.4, locality: float = 0.5,
                    correlation: float = 0.7, phase_tokens: int = 256, expert_bytes: int = 0) -> Trace:
    """A seeded synthetic trace (see the module docstring for the workloads)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload '{workload}'; expected one of {', '.join(WORKLOADS)}")
    if not (0 < top_k <= num_experts) or num_tokens <= 0 or num_layers <= 0 or batch <= 0:
        raise ValueError(f"need 0 < top_k <= num_experts and positive tokens/layers/batch, got top_k={top_k}, "
                         f"num_experts={num_experts}, num_tokens={num_tokens}, num_layers={num_layers}, batch={batch}")
    rng = np.random.default_rng(seed)
    N, L, E, K = num_tokens, num_layers, num_experts, top_k
    ids = np.empty((N, L, K), np.int32)
    w = np.empty((N, L, K), np.float32)
    exps = rng.uniform(zipf_min, zipf_max, size=L)
    if workload == "uniform":
        base = np.zeros((L, E))
    else:
        base = np.stack([_zipf_logits(rng, E, exps[l]) for l in range(L)])  # [L, E]
    if workload == "bursty":
        phase = np.arange(N) // max(1, phase_tokens)
        for p in np.unique(phase):
            rows = phase == p
            for l in range(L):
                ids[rows, l], w[rows, l] = _top_k(rng, np.broadcast_to(_zipf_logits(rng, E, exps[l]), (rows.sum(), E)), K)
    elif workload == "correlated":
        maps = rng.integers(0, E, size=(L, E))  # expert e at layer l leads to maps[l, e] at l+1
        ids[:, 0], w[:, 0] = _top_k(rng, np.broadcast_to(base[0], (N, E)), K)
        for l in range(1, L):
            drawn, dw = _top_k(rng, np.broadcast_to(base[l], (N, E)), K)
            follow = rng.random((N, K)) < correlation
            mapped = maps[l - 1][ids[:, l - 1]]                                  # [N, K]
            merged = np.where(follow, mapped, drawn)
            for n in range(N):  # keep the k choices distinct: fill duplicates from the drawn ones
                row, seen = [], set()
                for e in list(merged[n]) + list(drawn[n]) + list(range(E)):
                    if e not in seen:
                        seen.add(e)
                        row.append(e)
                    if len(row) == K:
                        break
                ids[n, l] = row
            w[:, l] = dw
    else:
        for l in range(L):
            ids[:, l], w[:, l] = _top_k(rng, np.broadcast_to(base[l], (N, E)), K)
        if workload == "temporal":
            for n in range(1, N):
                for l in range(L):
                    keep = rng.random(K) < locality
                    if keep.any():
                        row = [e for e, kp in zip(ids[n - 1, l], keep) if kp]
                        row += [e for e in ids[n, l] if e not in row]
                        ids[n, l] = row[:K]
    step_starts = np.append(np.arange(0, N, batch), N).astype(np.int64)
    prompt_starts = np.arange(0, N, max(1, prompt_tokens)).astype(np.int64)
    return Trace(expert_ids=ids, gate_weights=w, step_starts=step_starts, prompt_starts=prompt_starts,
                 num_experts=E, model=f"synthetic:{workload}", arch="synthetic", expert_bytes=expert_bytes,
                 extra=dict(workload=workload, seed=seed, batch=batch)).validate("synthetic trace")
