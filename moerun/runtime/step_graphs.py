"""The static buffers and segments of one decode-step shape: what the fast decode path replays.

Notation: B sequences, Q new tokens per sequence (1..16), T = B*Q tokens, H hidden size, K experts
per token, V vocabulary, L = max_context.

A step runs the model's own transformers modules (embedding, rotary embedding, norms, attention,
routers, shared experts, lm_head), op for op, as segments (segments.py) over static buffers, so
each can be captured once as a CUDA graph and replayed. Per MoE decoder layer:

    attention      input norm -> self-attention over the static KV cache -> residual -> post norm
                   -> router -> top-k (-> the routing override, if one is installed) -> x, ids,
                   weights copied to pinned host buffers
    shared         shared experts on x (queued behind attention: the GPU runs them while the host plans)
    (host)         the step driver (fast_decode.py) waits for the copies and lets the runtime plan
    experts        fused MoE over the slots (reads the slot table on the device)
    residual       shared output + residual (residual_cpu: the same plus the CPU executor's partial)
    predict_next   lookahead only: the next MoE layer's post norm and router on the residual stream
                   -> predicted ids copied to a pinned host buffer

A dense decoder layer is one segment; ``head`` (embedding, rotary) and ``tail`` (final norm,
lm_head) are segments too. ``whole`` holds the step as one graph for steps that need no host
decision between layers (every expert resident, or routed experts skipped).

This module builds; it does not decide which segments run (fast_decode.py does) and knows nothing
about the policy.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import generate_hooks
from .offload import HostStep, merge_cpu_partial
from .segments import Segment

if TYPE_CHECKING:
    from .fast_decode import FastDecoder


@dataclass
class MoeSegments:
    """The segments of one MoE decoder layer (module docstring); ``shared`` is None without shared
    experts, ``predict_next`` None for the last MoE layer. Two sets of host buffers: each layer has
    its own ids and weights, so a whole-step graph leaves every layer's routing on the host, and
    whole steps alternate between the sets so the engine reads one step's while the next runs.
    ``run_attention(host=, to_host=)`` is the attention segment's function with the host set as argument."""

    block: nn.Module
    hosts: tuple[HostStep, HostStep]
    run_attention: functools.partial
    attention: Segment
    shared: Segment | None
    experts: Segment
    residual: Segment
    residual_cpu: Segment
    predict_next: Segment | None

    def segments(self):
        return [s for s in (self.attention, self.shared, self.experts, self.residual, self.residual_cpu,
                            self.predict_next) if s is not None]


# -- the device parts of the segments ----------------------------------------------------------------
# Functions of the step buffers and the layer's modules (not closures over one layer), so that with
# compile_decode one compiled function serves every layer: torch.compile treats the modules'
# parameters and the buffers' tensors as inputs. (The attention still specializes on its layer index,
# which selects the layer's KV cache, so the compiler retraces it per layer; its generated code is
# reused from the compiler's cache.) ``cache_arg`` is the KV cache's argument name in the installed
# transformers (transformers_contract).
def _head(buf: "StepBuffers", base) -> None:
    buf.h.copy_(base.embed_tokens(buf.input_ids))
    pe = base.rotary_emb(buf.h, buf.position_ids)
    for dst, src in zip(buf.pe, pe) if isinstance(pe, tuple) else ((buf.pe, pe),):
        dst.copy_(src)


def _tail(buf: "StepBuffers", model, keep: int) -> None:
    hs = model.get_decoder().norm(buf.h)  # [B, Q, H]
    if keep != hs.shape[1]:
        hs = hs[:, -keep:, :]
    buf.logits.copy_(model.lm_head(hs))


def _dense(buf: "StepBuffers", layer, cache, cache_arg: str, mask: torch.Tensor) -> None:
    buf.h.copy_(layer(buf.h, attention_mask=mask, position_embeddings=buf.pe, position_ids=buf.position_ids,
                      use_cache=True, **{cache_arg: cache}))


def _attention_router(buf: "StepBuffers", layer, block, cache, cache_arg: str, mask: torch.Tensor) -> None:
    """The decoder layer's forward up to its MLP (transformers' order and ops), then the router; ``mask``
    is the buffer of the layer's attention kind (full or sliding window)."""
    t, hidden = buf.x.shape
    residual = buf.h
    hs = layer.input_layernorm(buf.h)
    hs, _ = layer.self_attn(hidden_states=hs, attention_mask=mask, position_embeddings=buf.pe,
                            position_ids=buf.position_ids, use_cache=True, **{cache_arg: cache})
    buf.resid.copy_(residual + hs)
    buf.x.copy_(layer.post_attention_layernorm(buf.resid).reshape(t, hidden))
    ids, weights = block.adapter.route(block.gate, buf.x)  # [T, K], [T, K] fp32
    buf.ids.copy_(ids)
    buf.weights.copy_(weights)


def _predict_next(buf: "StepBuffers", block) -> None:
    buf.pred.copy_(block.predict_next(buf.h.view(buf.x.shape)))


def _shared(buf: "StepBuffers", block) -> None:
    buf.s.copy_(block.adapter.shared_output(block, buf.x))


def _residual(buf: "StepBuffers", has_shared: bool) -> None:
    y = buf.y + buf.s if has_shared else buf.y  # [T, H]
    buf.h.copy_(buf.resid + y.view(buf.h.shape))


DEVICE_PARTS: dict[str, Callable[..., None]] = {
    "head": _head, "tail": _tail, "dense": _dense, "attention_router": _attention_router, "shared": _shared,
    "residual": _residual, "predict_next": _predict_next}


class StepBuffers:
    """Static buffers and segments of one (B, Q, logits kept) step shape."""

    def __init__(self, decoder: "FastDecoder", batch: int, tokens: int, keep: int, masks: dict[str, torch.Tensor]):
        model = decoder.model()
        dev, dtype = decoder.device, decoder.dtype
        cfg, base = model.config, model.get_decoder()
        hidden, top_k = decoder.adapter.hidden_size, decoder.adapter.top_k
        t = batch * tokens
        self.batch, self.tokens, self.keep = batch, tokens, keep
        self.input_ids = torch.zeros(batch, tokens, dtype=torch.long, device=dev)  # [B, Q]
        self.position_ids = torch.zeros(batch, tokens, dtype=torch.long, device=dev)  # [B, Q]
        # [B, 1, Q, L] per attention kind (full, sliding window), as transformers builds them (bool or additive)
        self.masks = {kind: torch.zeros_like(m) for kind, m in masks.items()}
        kinds = generate_hooks.layer_types(cfg)
        self.h = torch.zeros(batch, tokens, hidden, dtype=dtype, device=dev)  # [B, Q, H] residual stream
        self.resid = torch.zeros_like(self.h)  # [B, Q, H] after attention + residual
        self.x = torch.zeros(t, hidden, dtype=dtype, device=dev)  # [T, H] MoE input
        self.ids = torch.zeros(t, top_k, dtype=torch.long, device=dev)  # [T, K]
        self.weights = torch.zeros(t, top_k, dtype=torch.float32, device=dev)  # [T, K]
        self.pred = torch.zeros(t, top_k, dtype=torch.long, device=dev)  # [T, K]
        self.y = torch.zeros(t, hidden, dtype=dtype, device=dev)  # [T, H] routed experts' output
        self.s = torch.zeros(t, hidden, dtype=dtype, device=dev)  # [T, H] shared experts' output
        # Recorded behind attention's host copies: the host waits on it, not on the shared experts after.
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None
        self.predicted = torch.cuda.Event() if dev.type == "cuda" else None  # behind predict_next's copy
        self.logits = torch.zeros(batch, keep, cfg.vocab_size, dtype=dtype, device=dev)  # [B, keep, V]
        pe = base.rotary_emb(self.h, self.position_ids)  # rotary (cos, sin) or whatever the model returns
        self.pe = tuple(p.clone() for p in pe) if isinstance(pe, tuple) else pe.clone()  # static
        on_cuda = dev.type == "cuda"

        # Host buffers of their own on the CPU too: each MoE layer keeps its routing in its own ids and
        # weights (a whole step's accounting reads every layer's after the step), which one shared device
        # buffer cannot hold.
        def pinned(like):
            return torch.empty(like.shape, dtype=like.dtype, pin_memory=on_cuda)
        # x, pred and the CPU partial serve one layer at a time; ids and weights are per layer.
        x_host, pred_host = pinned(self.x), pinned(self.pred)
        cpu_out = torch.empty(t, hidden, dtype=torch.float32, pin_memory=on_cuda)  # [T, H]
        cache, cache_arg = decoder.cache.cache, decoder.cache_arg
        override = decoder.routing_override
        warmup = 2 if decoder.compile_backend else 1

        def seg(name, fn):
            return Segment(name, fn, capture=decoder.capture, pool=decoder.pool, warmup=warmup)

        def device_part(kind, *args):  # device-only work of one kind, compiled once per kind when compiling
            return functools.partial(decoder.device_fn(kind), self, *args)

        self._head_fn, self._tail_fn = device_part("head", base), device_part("tail", model, keep)
        self.head, self.tail = seg("head", self._head_fn), seg("tail", self._tail_fn)
        self.layers: list[Segment | MoeSegments] = []  # per decoder layer: dense layers are one segment
        for index, layer in enumerate(base.layers[: cfg.num_hidden_layers]):
            block = layer.mlp
            if not hasattr(block, "moe_index"):
                self.layers.append(seg(f"dense{index}", device_part("dense", layer, cache, cache_arg,
                                                                    self.masks[kinds[index]])))
                continue
            hosts = tuple(HostStep(x=x_host, ids=pinned(self.ids), weights=pinned(self.weights), cpu_out=cpu_out)
                          for _ in range(2))

            def attention(device_fn, host=hosts[0], to_host=("x", "ids", "weights")):
                device_fn()
                if override is not None:  # inside the graph: a replay draws anew
                    override.rewrite(self.ids, self.weights)
                for name in to_host:  # outside the compiled part: device -> pinned host copies
                    getattr(host, name).copy_(getattr(self, name), non_blocking=on_cuda)

            def predict_next(device_fn):
                device_fn()
                pred_host.copy_(self.pred, non_blocking=on_cuda)

            def experts(block=block):
                decoder.runtime.moe_kernel(block.moe_index, self.x, self.ids, self.weights, out=self.y)

            def residual_cpu(has_shared=bool(block.adapter.shared_modules)):
                y = merge_cpu_partial(self.y, cpu_out)  # [T, H]
                if has_shared:
                    y = y + self.s
                self.h.copy_(self.resid + y.view(self.h.shape))

            # predict_next exists where there is a next MoE layer; whether it runs follows the policy
            # (a hot swap may turn lookahead on or off between steps).
            ahead = None
            if block.next_gate is not None:
                ahead = seg(f"predict_next{index}", functools.partial(predict_next, device_part("predict_next", block)))
            has_shared = bool(block.adapter.shared_modules)
            run_attention = functools.partial(attention, device_part("attention_router", layer, block, cache, cache_arg,
                                                                     self.masks[kinds[index]]))
            self.layers.append(MoeSegments(
                block, hosts, run_attention, seg(f"attention{index}", run_attention),
                seg(f"shared{index}", device_part("shared", block)) if has_shared else None,
                seg(f"experts{index}", experts), seg(f"residual{index}", device_part("residual", has_shared)),
                seg(f"residual_cpu{index}", residual_cpu), ahead))
        self.pred_host = pred_host  # [T, K] the last predict_next's ids
        # Whole-step graphs (one launch per step) for steps that need no host decision between layers.
        # "resident" has one graph per host set; done[i] marks the end of the last replay of resident[i].
        self.whole = {"resident": [seg(f"step{i}", functools.partial(self._whole_step, routed=True, hosts=i))
                                   for i in range(2)],
                      "skip_routed": [seg("step-dense", functools.partial(self._whole_step, routed=False))]}
        self.done = [torch.cuda.Event() if on_cuda else None for _ in range(2)]
        self.parity = 0  # the host set of the next whole step

    def _whole_step(self, routed: bool, hosts: int = 0) -> None:
        """A whole decode step with no host sync: every MoE layer runs attention, shared, experts (when
        ``routed``) and residual. Only what the engine's accounting reads goes to the host (set
        ``hosts``): the routing, when the routed experts run. Every copy is a graph node the step
        waits on (a few microseconds each)."""
        self._head_fn()
        for entry in self.layers:
            if isinstance(entry, Segment):
                entry.fn()
                continue
            entry.run_attention(host=entry.hosts[hosts], to_host=("ids", "weights") if routed else ())
            if entry.shared is not None:
                entry.shared.fn()
            if routed:
                entry.experts.fn()
            entry.residual.fn()
        self._tail_fn()

    def segments(self):
        yield self.head
        yield self.tail
        for graphs in self.whole.values():
            yield from graphs
        for entry in self.layers:
            yield from entry.segments() if isinstance(entry, MoeSegments) else (entry,)
