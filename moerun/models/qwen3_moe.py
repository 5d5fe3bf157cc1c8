"""Qwen3-MoE: softmax top-k with renormalisation per ``norm_topk_prob``; no shared expert."""
from __future__ import annotations

from .qwen2_moe import Qwen2MoeAdapter


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    # Same router and layer rule as Qwen2-MoE, without the shared expert.
    model_type = "qwen3_moe"
    shared_modules = ()

    def shared_output(self, block, x):
        return None
