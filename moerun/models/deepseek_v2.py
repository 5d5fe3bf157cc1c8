"""DeepSeek-V2: fp32 softmax, greedy or group-limited (group max) top-k, no renormalisation
(``norm_topk_prob`` is ignored, as in transformers), ``routed_scaling_factor``; ungated shared
experts; the first ``first_k_dense_replace`` layers are dense."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoeAdapter, group_mask


class DeepseekV2Adapter(MoeAdapter):
    model_type = "deepseek_v2"
    shared_modules = ("shared_experts",)

    @property
    def num_experts(self) -> int:
        return self.config.n_routed_experts

    def kv_elems_per_token(self) -> int:
        # transformers (5.17 on) caches MLA's compressed latent, not per-head keys/values: the
        # normalised kv latent [kv_lora_rank] and the shared rotary key [qk_rope_head_dim].
        cfg = self.config
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim

    def moe_layers(self) -> list[int]:
        return list(range(self.config.first_k_dense_replace, self.num_layers))

    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        logits = F.linear(x.float(), gate.weight.float())  # [T, E] fp32
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if cfg.topk_method == "group_limited_greedy":
            groups = scores.view(-1, cfg.n_group, self.num_experts // cfg.n_group)  # [T, G, E/G]
            keep = group_mask(groups.max(dim=-1).values, cfg.topk_group, self.num_experts)
            scores = scores.masked_fill(~keep, 0.0)
        elif cfg.topk_method != "greedy":
            raise ValueError(
                f"deepseek_v2 topk_method {cfg.topk_method!r} is not supported by transformers; "
                "expected 'greedy' or 'group_limited_greedy'"
            )
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [T, K]
        return ids, weights * cfg.routed_scaling_factor

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.shared_experts(x)  # [T, H]
