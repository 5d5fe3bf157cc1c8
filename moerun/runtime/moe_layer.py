"""``OffloadedMoE``: the module that takes the place of a transformers MoE block.

It keeps the block's router and shared experts (same attribute names, so state-dict keys do not
change) and drops the routed experts, which live in the host pool and the slot arena. Forward:
route on the device, hand the routing to the runtime's step, add the shared experts. Called by
transformers' decoder layer as ``block(hidden_states)`` with ``[B, S, H]``. For lookahead prefetch
the block also predicts the next MoE layer's experts once its decoder layer is done: that layer's
router on that layer's post-attention norm of the residual stream this layer produced (the next
router's true input lacks only the next attention's output), handed to the runtime, which prefetches
them while the next attention runs.

A routing override (``routing_override``, fast_decode.RoutingOverride: the benchmarks' uniform routing)
rewrites the router's choice here as the fast path's segments do inside their graphs;
:func:`install_routing_override` puts one object on both paths. The product installs none.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.base import MoeAdapter
from .offload import OffloadRuntime


class OffloadedMoE(nn.Module):
    """One MoE layer whose routed experts are served by an :class:`OffloadRuntime`."""

    def __init__(self, block: nn.Module, *, layer: int, moe_index: int, adapter: MoeAdapter,
                 runtime: OffloadRuntime):
        super().__init__()
        self.layer = layer            # decoder layer index in the model
        self.moe_index = moe_index    # index among MoE layers: the runtime's, engine's and arena's layer id
        router = getattr(block, adapter.router_attr)
        setattr(self, adapter.router_attr, router)  # transformers' name: the state-dict keys stay
        if adapter.router_attr != "gate":
            self.__dict__["gate"] = router  # the name moerun's code reads it by
        for name in adapter.shared_modules:
            setattr(self, name, getattr(block, name))
        # Plain attributes (not submodules): shared objects, not part of this module's state.
        self.__dict__["adapter"] = adapter
        self.__dict__["runtime"] = runtime
        self.__dict__["next_gate"] = None  # the next MoE layer's router, set by link_lookahead
        self.__dict__["next_norm"] = None  # and its post-attention norm
        self.__dict__["routing_override"] = None  # a RoutingOverride, or None: the router's own choice
        self.next_moe_index: int | None = None

    def link_lookahead(self, next_moe_index: int, next_gate: nn.Module, next_norm: nn.Module) -> None:
        """Let this layer predict the next MoE layer's experts with that layer's router and norm."""
        self.next_moe_index = next_moe_index
        self.__dict__["next_gate"] = next_gate
        self.__dict__["next_norm"] = next_norm

    def predict_next(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[T, K]`` the next MoE layer's experts as its router picks them from ``hidden`` ``[T, H]``,
        the residual stream after this layer."""
        return self.adapter.route(self.next_gate, self.next_norm(hidden))[0]

    def after_layer(self, module: nn.Module, args, output) -> None:
        """Forward hook of this block's decoder layer (transformers path): lookahead prefetch."""
        if self.runtime.lookahead and self.next_gate is not None:
            h = output[0] if isinstance(output, tuple) else output  # [B, S, H]
            self.runtime.prefetch_ahead(self.next_moe_index, self.predict_next(h.reshape(-1, h.shape[-1])))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape  # [B, S, H]
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        ids, weights = self.adapter.route(self.gate, x)  # [T, K] int64, [T, K] fp32
        override = self.routing_override
        if override is not None and not override.runs_experts:
            y = torch.zeros_like(x)  # the routed experts skipped (their output is zero)
        else:
            if override is not None:
                ids, weights = ids.contiguous(), weights.contiguous()
                override.rewrite(ids, weights)
            # More than one new token per sequence: a prefill (or a chunk of one).
            y = self.runtime.run(self.moe_index, x, ids, weights, prefill=shape[1] > 1)  # [T, H]
        shared = self.adapter.shared_output(self, x)
        if shared is not None:
            y = y + shared
        return self.adapter.block_output(y.reshape(shape), weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, moe_index={self.moe_index}"


def install_routing_override(model: nn.Module, override) -> None:
    """Route every MoE layer of a loaded model through ``override`` (a fast_decode.RoutingOverride, or
    None for the model's own routing) on both paths: transformers' layers (prefill, and decode with the
    fast path off) and the fast decode path's segments."""
    for module in model.modules():
        if isinstance(module, OffloadedMoE):
            module.__dict__["routing_override"] = override
    model.moerun.decoder.routing_override = override
