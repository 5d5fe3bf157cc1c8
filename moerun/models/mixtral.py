"""Mixtral: softmax top-k, always renormalised, weights kept in fp32; checkpoint keys under
``block_sparse_moe`` with ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoeAdapter, softmax_topk


class MixtralAdapter(MoeAdapter):
    model_type = "mixtral"
    expert_weight_names = ("w1", "w3", "w2")
    checkpoint_block_attr = "block_sparse_moe"

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def expert_inter_size(self) -> int:
        return self.config.intermediate_size

    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, gate.weight)  # [T, E]
        weights, ids = softmax_topk(logits.float(), self.top_k, renormalize=True)
        return ids, weights
