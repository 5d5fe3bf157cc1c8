"""Qwen1.5/Qwen2-MoE: softmax top-k (optionally renormalised) and a sigmoid-gated shared expert."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoeAdapter, softmax_topk


class Qwen2MoeAdapter(MoeAdapter):
    model_type = "qwen2_moe"
    shared_modules = ("shared_expert", "shared_expert_gate")

    def moe_layers(self) -> list[int]:
        # Same rule as Qwen2MoeDecoderLayer: sparse every decoder_sparse_step, minus mlp_only_layers.
        cfg = self.config
        return [
            layer for layer in range(cfg.num_hidden_layers)
            if layer not in cfg.mlp_only_layers
            and cfg.num_experts > 0 and (layer + 1) % cfg.decoder_sparse_step == 0
        ]

    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, gate.weight)  # [T, E] in the model dtype
        weights, ids = softmax_topk(logits, self.top_k, renormalize=self.config.norm_topk_prob)
        return ids, weights.to(logits.dtype).float()  # transformers casts the weights to x.dtype

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)  # [T, H]
