"""gpt-oss: a router with a bias, top-k on the logits then a softmax over the k chosen (in the model
dtype, as transformers' ``GptOssTopKRouter``); experts with biases and the clamped SwiGLU; the block
returns ``(hidden, router_scores)``.

The checkpoint stacks each layer's experts (``mlp.experts.gate_up_proj`` [E, H, 2I] with gate and up
columns interleaved, ``down_proj`` [E, I, H], ``x @ W``, each with a ``_bias``), or, as published on the
hub, packs them in MXFP4 (``gate_up_proj_blocks`` [E, 2I, H/32, 16] uint8, ``_scales`` [E, 2I, H/32]
e8m0, ``down_proj_blocks`` / ``_scales`` likewise over [E, H, I], biases beside them). The router lives
at ``mlp.router`` (``weight`` [E, H], ``bias`` [E]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ExpertActivation, MoeAdapter

# GptOssExperts' sigmoid gain and clamp (transformers before 5.25 hard-codes them; config fields from 5.25 on).
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class GptOssAdapter(MoeAdapter):
    model_type = "gpt_oss"
    router_attr = "router"
    stacked_experts = True

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def expert_inter_size(self) -> int:
        return self.config.intermediate_size  # the experts' width; gpt-oss has no dense MLP

    @property
    def expert_activation(self) -> ExpertActivation:
        # transformers before 5.25 hard-codes alpha 1.702 and limit 7.0 in GptOssExperts (the published
        # values) and its config has neither field; 5.25 reads config.swiglu_alpha / config.swiglu_limit.
        cfg = self.config
        return ExpertActivation("swiglu_clamped", alpha=float(getattr(cfg, "swiglu_alpha", SWIGLU_ALPHA)),
                                limit=float(getattr(cfg, "swiglu_limit", SWIGLU_LIMIT)), bias=True)

    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, gate.weight, gate.bias)  # [T, E] in the model dtype
        top, ids = torch.topk(logits, self.top_k, dim=-1)  # [T, K]
        weights = F.softmax(top, dim=1, dtype=top.dtype)  # over the k chosen, in the model dtype
        return ids, weights.float()

    def block_output(self, hidden: torch.Tensor, weights: torch.Tensor):
        # GptOssDecoderLayer unpacks ``hidden, _ = self.mlp(x)``: a bare [B, S, H] would be unpacked
        # along the batch (silently wrong at batch 2).
        return hidden, weights
