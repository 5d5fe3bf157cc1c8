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

from .base import MoeAdapter

# Tensor names under ``model.layers.{l}.mlp.experts.`` of the two checkpoint layouts, per projection.
FLOAT_EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
MXFP4_EXPERT_TENSORS = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                        "down_proj_blocks", "down_proj_scales", "down_proj_bias")


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
    def swiglu_limit(self) -> float:
        # transformers before 5.25 hard-codes 7.0 in GptOssExperts (the published value); the config
        # field exists in both and holds it.
        return float(getattr(self.config, "swiglu_limit", 7.0))

    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, gate.weight, gate.bias)  # [T, E] in the model dtype
        top, ids = torch.topk(logits, self.top_k, dim=-1)  # [T, K]
        weights = F.softmax(top, dim=1, dtype=top.dtype)  # over the k chosen, in the model dtype
        return ids, weights.float()

    def block_output(self, hidden: torch.Tensor, weights: torch.Tensor):
        # GptOssDecoderLayer unpacks ``hidden, _ = self.mlp(x)``: a bare [B, S, H] would be unpacked
        # along the batch (silently wrong at batch 2).
        return hidden, weights
