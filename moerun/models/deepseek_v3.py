"""DeepSeek-V3: fp32 sigmoid scores, ``e_score_correction_bias`` added for the choice only,
group-limited top-k (groups scored by the sum of their top 2), unbiased weights renormalised per
``norm_topk_prob`` (+1e-20), ``routed_scaling_factor``; ungated shared experts; dense first layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import group_mask
from .deepseek_v2 import DeepseekV2Adapter


class DeepseekV3Adapter(DeepseekV2Adapter):
    model_type = "deepseek_v3"

    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        logits = F.linear(x.float(), gate.weight.float())  # [T, E] fp32
        scores = logits.sigmoid()
        choice = scores + gate.e_score_correction_bias  # [T, E]
        groups = choice.view(-1, cfg.n_group, self.num_experts // cfg.n_group)  # [T, G, E/G]
        keep = group_mask(groups.topk(2, dim=-1)[0].sum(dim=-1), cfg.topk_group, self.num_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # [T, K]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor
