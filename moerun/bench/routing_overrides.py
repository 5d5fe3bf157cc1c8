"""Routing overrides the benchmarks install on the fast decode path (fast_decode.RoutingOverride).

Each replaces what the model's routers chose, inside the step's graphs, to measure a case the
model's own routing does not produce. The tokens generated under one are not the model's.
"""
from __future__ import annotations

import torch


class UniformRouting:
    """Every token's K experts drawn uniformly at random (distinct, equal gate weights) in every MoE
    layer, on the device: the worst case for any cache (random-weight checkpoints route far from
    uniformly), seen by the engine, the copies and the CPU experts as a real routing would be."""

    runs_experts = True

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def rewrite(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        tokens, top_k = ids.shape  # [T, K]
        ids.copy_(torch.rand(tokens, self.num_experts, device=ids.device).topk(top_k, dim=-1).indices)
        weights.fill_(1.0 / top_k)


class SkipRoutedExperts:
    """MoE layers skip their routed experts (no sync, no plan, no kernel; their output is zero), so a
    step times the dense part of the model alone."""

    runs_experts = False

    def rewrite(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        pass  # never runs: the step skips the routed experts (and the router's output is unused)
