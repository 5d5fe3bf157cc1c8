"""What moerun needs to know about one MoE architecture, and the routing math the adapters share.

An adapter answers, for one ``transformers`` model type: which decoder layers hold a routed MoE
block and where that block lives, how its router turns hidden states into (expert ids, gate
weights) — exactly as transformers does, dtype for dtype — which child modules are shared experts
(kept on the model's device and added to the routed output), and the checkpoint key names of the
gate/up/down weights of expert ``e`` in layer ``l``.

Notation: T tokens, H hidden size, E routed experts, K experts per token, I expert width.
Adapters know nothing about slots, policies or offloading.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class ExpertActivation:
    """How an expert turns its gate and up projections into the input of down, and whether its
    projections carry biases (csrc/expert_activation.h defines the activations; the names are
    ``moerun.native.EXPERT_ACTIVATIONS``). Every compute path takes it: the Triton kernels, the host
    kernel and the CPU executor; with ``bias`` the slot layout holds the biases."""

    name: str = "silu"    # "silu": silu(g) * u; "swiglu_clamped": gpt-oss's clamped SwiGLU
    alpha: float = 1.0    # swiglu_clamped: h = (u' + 1) * g' * sigmoid(alpha * g')
    limit: float = 0.0    # swiglu_clamped: g' = min(g, limit), u' = clamp(u, -limit, limit)
    bias: bool = False    # gate_up [2I] and down [H] biases, added to each projection


@dataclass(frozen=True)
class ExpertKeys:
    """Checkpoint tensor names of one routed expert (``F.linear`` layout, as stored)."""

    gate: str  # [I, H]
    up: str    # [I, H]
    down: str  # [H, I]


class MoeAdapter(ABC):
    """Base adapter: qwen2_moe-style layout (``model.layers.{l}.mlp`` with ``gate`` + ``experts``).

    Subclasses set the class attributes and override :meth:`route` (and the layout hooks where
    their architecture differs).
    """

    model_type: ClassVar[str]
    # Children of the MoE block kept on the device next to the router, added to the routed output.
    shared_modules: ClassVar[tuple[str, ...]] = ()
    # Name of the per-expert weights in the checkpoint: (gate, up, down).
    expert_weight_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    # Module attribute of the MoE block in memory vs the name used in checkpoint keys.
    block_attr: ClassVar[str] = "mlp"
    checkpoint_block_attr: ClassVar[str] = "mlp"
    # The MoE block's router child (kept on the device under this name, so its state-dict keys stay).
    router_attr: ClassVar[str] = "gate"
    # Whether the checkpoint holds each layer's experts stacked in one tensor per projection
    # (``experts.gate_up_proj`` [E, ...]) rather than per-expert keys ``experts.{e}.gate_proj.weight``.
    stacked_experts: ClassVar[bool] = False

    def __init__(self, config: PretrainedConfig):
        self.config = config
        # Group 1: the layer; group 2: the expert (None for stacked experts: one key holds them all).
        expert = r"(?:(\d+)\.)?" if self.stacked_experts else r"(\d+)\."
        self._expert_key_re = re.compile(
            r"^model\.layers\.(\d+)\." + re.escape(self.checkpoint_block_attr) + r"\.experts\." + expert
        )

    # -- shapes -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def expert_inter_size(self) -> int:
        return self.config.moe_intermediate_size

    def kv_elems_per_token(self) -> int:
        """Key + value elements one token adds to the KV cache of one decoder layer."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_key_value_heads * head_dim

    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers whose MLP is a routed MoE block."""
        return list(range(self.num_layers))

    # -- layout -------------------------------------------------------------------------------
    def block_path(self, layer: int) -> str:
        """``named_modules()`` name of layer ``layer``'s MoE block."""
        return f"model.layers.{layer}.{self.block_attr}"

    def expert_keys(self, layer: int, expert: int) -> ExpertKeys:
        """Checkpoint keys of the gate, up and down weights of ``expert`` in ``layer``."""
        prefix = f"model.layers.{layer}.{self.checkpoint_block_attr}.experts.{expert}."
        gate, up, down = self.expert_weight_names
        return ExpertKeys(f"{prefix}{gate}.weight", f"{prefix}{up}.weight", f"{prefix}{down}.weight")

    def stacked_expert_prefix(self, layer: int) -> str:
        """Checkpoint key prefix of layer ``layer``'s stacked expert tensors (``stacked_experts``)."""
        return f"model.layers.{layer}.{self.checkpoint_block_attr}.experts."

    def is_routed_expert_key(self, key: str) -> bool:
        """Whether checkpoint ``key`` is a routed-expert weight (streamed to the host pool)."""
        return self._expert_key_re.match(key) is not None

    def module_key(self, checkpoint_key: str) -> str:
        """The in-memory parameter name of a non-expert checkpoint key."""
        if self.checkpoint_block_attr == self.block_attr:
            return checkpoint_key
        return checkpoint_key.replace(f".{self.checkpoint_block_attr}.", f".{self.block_attr}.", 1)

    # -- math ---------------------------------------------------------------------------------
    @abstractmethod
    def route(self, gate: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids ``[T, K]`` int64 and gate weights ``[T, K]`` fp32 of tokens ``x`` ``[T, H]``.

        ``gate`` is the block's router module (its parameters on the model's device). The weights
        carry the rounding transformers applies (cast to the model dtype where it casts).
        """

    def shared_output(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Shared-expert contribution ``[T, H]`` for tokens ``x`` ``[T, H]``, or None."""
        return None

    @property
    def expert_activation(self) -> ExpertActivation:
        """The routed experts' activation and biases: ``silu(gate) * up``, no biases, unless an
        architecture says otherwise."""
        return ExpertActivation()

    def block_output(self, hidden: torch.Tensor, weights: torch.Tensor):
        """What the MoE block returns to its decoder layer, given its output ``hidden`` ``[B, S, H]`` and
        the routing weights ``[T, K]``: the tensor itself for most architectures."""
        return hidden


def softmax_topk(
    logits: torch.Tensor, top_k: int, *, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax over experts, top-k, optional renormalisation: ``(weights [T,K], ids [T,K])``."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """Boolean ``[T, E]`` mask of the experts inside each token's ``topk_group`` best groups."""
    tokens, num_groups = group_scores.shape
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]  # [T, G']
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # [T, G]
    return mask.unsqueeze(-1).expand(tokens, num_groups, num_experts // num_groups).reshape(
        tokens, num_experts
    ).bool()
