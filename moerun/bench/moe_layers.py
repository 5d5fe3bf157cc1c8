"""Where a transformers model keeps its routed experts, for the baselines that replace or watch them.

transformers 5.x stores each MoE layer's routed experts as one fused module with ``gate_up_proj``
``[E, 2I, H]`` (rows [0, I) gate, [I, 2I) up) and ``down_proj`` ``[E, H, I]``, called as
``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``. This module finds those
modules in document order; it knows nothing about devices or caching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertsSite:
    """One MoE layer's fused experts module and where it hangs in the model."""

    moe_layer: int            # 0-based index among the model's MoE layers
    name: str                 # named_modules() name, e.g. "model.layers.3.mlp.experts"
    parent: torch.nn.Module
    attr: str
    module: torch.nn.Module


def _is_fused_experts(module: torch.nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3 and down.dim() == 3
    )


def find_experts(model: torch.nn.Module) -> list[ExpertsSite]:
    """Every fused routed-experts module of ``model``, in layer order.

    Raises ValueError for fused layouts the bench's expert math does not implement (transposed,
    interleaved gate/up, biases), naming the module.
    """
    parents = dict(model.named_modules())
    sites = []
    for name, module in model.named_modules():
        if not _is_fused_experts(module):
            continue
        unsupported = [flag for flag in ("is_transposed", "has_bias") if getattr(module, flag, False)]
        if not getattr(module, "is_concatenated", True):
            unsupported.append("interleaved gate/up")
        if not getattr(module, "has_gate", True):
            unsupported.append("no gate")
        if unsupported:
            raise ValueError(
                f"{name}: experts layout ({', '.join(unsupported)}) is not supported by the bench's "
                "baselines; they expect gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]"
            )
        parent_name, _, attr = name.rpartition(".")
        sites.append(ExpertsSite(len(sites), name, parents[parent_name], attr, module))
    return sites


def expert_forward(
    hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn, inter_size: int
) -> torch.Tensor:
    """One expert on the rows of ``hidden`` [N, H]: down(act(gate(x)) * up(x)) -> [N, H] in hidden.dtype."""
    gate_up_out = torch.nn.functional.linear(hidden, gate_up)      # [N, 2I]
    activated = act_fn(gate_up_out[:, :inter_size]) * gate_up_out[:, inter_size:]  # [N, I]
    return torch.nn.functional.linear(activated, down)             # [N, H]
