"""OLMoE: softmax top-k, renormalised per ``norm_topk_prob``, every layer sparse, no shared expert."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoeAdapter, softmax_topk


class OlmoeAdapter(MoeAdapter):
    model_type = "olmoe"

    @property
    def expert_inter_size(self) -> int:
        return self.config.intermediate_size  # OLMoE has no separate MoE width

    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, gate.weight)  # [T, E]
        weights, ids = softmax_topk(logits, self.top_k, renormalize=self.config.norm_topk_prob)
        return ids, weights.to(logits.dtype).float()  # transformers casts the weights to x.dtype
