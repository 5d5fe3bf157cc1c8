"""The fast decode path: decode steps as CUDA graphs over a static KV cache, one host sync per MoE layer.

Notation: B sequences, Q new tokens per sequence (1..16), T = B*Q tokens, H hidden size, K experts
per token, V vocabulary, L = max_context.

A decode step runs the model's own transformers modules (embedding, rotary embedding, norms,
attention, routers, shared experts, lm_head), so the math is transformers' op for op, but as
segments over static buffers (segments.py) instead of transformers' per-layer Python:

    head      input ids -> embedding, rotary (cos, sin)
    per decoder layer, dense:  the whole decoder layer
    per decoder layer, MoE:
      A       input norm -> self-attention over the static KV cache -> residual -> post norm ->
              router -> top-k -> x, ids, weights copied to pinned host buffers
      S       shared experts on x (queued behind A: the GPU runs them while the host plans)
      (host)  wait for A's copies (the layer's only sync); the runtime plans, issues copies,
              starts CPU experts, makes the stream wait on the slots (OffloadRuntime phases)
      B       fused MoE over the slots (reads the slot table on the device)
      E       [+ CPU partial, when the plan has CPU experts] + shared output + residual
      P       (lookahead prefetch) the next MoE layer's post norm and router on the residual
              stream E produced -> predicted ids copied to a pinned host buffer; the host reads
              them once the next layer's A is queued and issues the prefetches, whose copies run
              while that A runs
    tail      final norm -> lm_head -> logits

When no expert can miss (the arena holds every expert: it is filled at load), no layer needs the
host between A and B: the whole step (head, every layer's A, S, B, E, tail) is one graph, one
launch per step, and the engine reads each layer's routing one step later, on the host while the
next step's graph runs (``OffloadRuntime.account``: the same accesses in the same order, so
statistics and adapt rules see what a planned step shows; ``flush_accounting`` catches up before
anything reads them). ``compile_backend`` fuses the segments' device parts with
torch.compile before capture (segments.py).

Prefill runs through transformers (eager) writing into the same static cache. The decoder hooks
the model's ``forward`` (decode steps with its cache go to the fast path, everything else to
transformers) and ``generate`` (which gets the moerun cache when the caller passes none), so
``generate()`` with greedy or sampled decoding, stopping criteria, streamers and left-padded
batches uses it transparently. Segments are built per (B, Q, logits kept) and reused across
generate() calls while the batch size stays.

This module knows nothing about the policy or the mechanism beyond OffloadRuntime's phases.
"""
from __future__ import annotations

import functools
import inspect
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.base import MoeAdapter
from ..transformers_contract import TransformersMismatch, fast_path_contract, mismatch
from .decode_cache import DecodeCache, DecodeMask
from .decode_profile import DecodeProfile
from .offload import HostStep, OffloadRuntime, merge_cpu_partial
from .segments import Segment, compiled

# Tokens per sequence step the fast path takes (the fused kernel's decode path covers them;
# memory.py reserves room for a step of max_batch x this many tokens).
MAX_STEP_TOKENS = 16
# The decoder-layer structure the segments reproduce (pre-norm: attention then MLP, each with a residual).
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
# forward() arguments a decode step may carry besides the KV cache (whose name depends on the transformers
# version: transformers_contract); any other argument (or a true output_* flag) goes to transformers.
_STEP_ARGS = {"input_ids", "position_ids", "attention_mask", "use_cache", "logits_to_keep",
              "return_dict", "output_attentions", "output_hidden_states", "output_router_logits"}


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run ``model`` (one line), or None when it can."""
    cfg = model.config
    try:
        fast_path_contract(model)
    except TransformersMismatch as exc:
        return str(exc)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in _ATTENTION_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} (the fast path runs {' or '.join(_ATTENTION_IMPLEMENTATIONS)})"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "sliding-window attention layers (the fast path covers full attention only)"
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention (the fast path covers full attention only)"
    decoder = model.get_decoder()
    for name in ("embed_tokens", "rotary_emb", "norm", "layers"):
        if not hasattr(decoder, name):
            return f"the decoder has no {name!r} (an unknown model layout)"
    if getattr(decoder.rotary_emb, "rope_type", "default") in ("dynamic", "longrope"):
        return f"rope type {decoder.rotary_emb.rope_type!r} updates its tables from the sequence length"
    for index, layer in enumerate(decoder.layers[: cfg.num_hidden_layers]):
        children = {name for name, _ in layer.named_children()}
        if children != _LAYER_CHILDREN:
            return (f"decoder layer {index} ({type(layer).__name__}) has children {sorted(children)}, not the "
                    f"pre-norm layout {sorted(_LAYER_CHILDREN)}")
    return None


@dataclass
class _MoeSegments:
    """The segments of one MoE decoder layer (module docstring): A, S (None without shared experts), B,
    E, E with the CPU partial, and P (the lookahead prediction; None for the last MoE layer);
    the layer's host buffers, two sets (each layer has its own ids and weights, so that a whole-step
    graph leaves every layer's routing on the host, and whole steps alternate between the sets so the
    engine reads one step's while the next step runs); and A's function with the host set as argument."""

    block: nn.Module
    hosts: tuple[HostStep, HostStep]
    run_a: functools.partial  # run_a(host=...): A's device part, then the copies into that host set
    a: Segment
    shared: Segment | None
    b: Segment
    e: Segment
    e_cpu: Segment
    ahead: Segment | None

    def segments(self):
        return [s for s in (self.a, self.shared, self.b, self.e, self.e_cpu, self.ahead) if s is not None]


def _notice(message: str) -> None:
    warnings.warn(f"moerun: {message}", RuntimeWarning, stacklevel=3)


# -- the device parts of the segments ----------------------------------------------------------------
# Functions of the step buffers and the layer's modules (not closures over one layer), so that with
# compile_decode one compiled function serves every layer: torch.compile treats the modules'
# parameters and the buffers' tensors as inputs. (The attention still specializes on its layer index,
# which selects the layer's KV cache, so the compiler retraces it per layer; its generated code is
# reused from the compiler's cache.)
def _head(buf: "_StepBuffers", base) -> None:
    buf.h.copy_(base.embed_tokens(buf.input_ids))
    pe = base.rotary_emb(buf.h, buf.position_ids)
    for dst, src in zip(buf.pe, pe) if isinstance(pe, tuple) else ((buf.pe, pe),):
        dst.copy_(src)


def _tail(buf: "_StepBuffers", model, keep: int) -> None:
    hs = model.get_decoder().norm(buf.h)  # [B, Q, H]
    if keep != hs.shape[1]:
        hs = hs[:, -keep:, :]
    buf.logits.copy_(model.lm_head(hs))


def _dense(buf: "_StepBuffers", layer, cache, cache_arg: str) -> None:
    buf.h.copy_(layer(buf.h, attention_mask=buf.mask, position_embeddings=buf.pe, position_ids=buf.position_ids,
                      use_cache=True, **{cache_arg: cache}))


def _attention_router(buf: "_StepBuffers", layer, block, cache, cache_arg: str) -> None:
    """The decoder layer's forward up to its MLP (transformers' order and ops), then the router."""
    t, hidden = buf.x.shape
    residual = buf.h
    hs = layer.input_layernorm(buf.h)
    hs, _ = layer.self_attn(hidden_states=hs, attention_mask=buf.mask, position_embeddings=buf.pe,
                            position_ids=buf.position_ids, use_cache=True, **{cache_arg: cache})
    buf.resid.copy_(residual + hs)
    buf.x.copy_(layer.post_attention_layernorm(buf.resid).reshape(t, hidden))
    ids, weights = block.adapter.route(block.gate, buf.x)  # [T, K], [T, K] fp32
    buf.ids.copy_(ids)
    buf.weights.copy_(weights)


def _predict_next(buf: "_StepBuffers", block) -> None:
    buf.pred.copy_(block.predict_next(buf.h.view(buf.x.shape)))


def _shared(buf: "_StepBuffers", block) -> None:
    buf.s.copy_(block.adapter.shared_output(block, buf.x))


def _residual(buf: "_StepBuffers", has_shared: bool) -> None:
    y = buf.y + buf.s if has_shared else buf.y  # [T, H]
    buf.h.copy_(buf.resid + y.view(buf.h.shape))


_DEVICE_PARTS = {"head": _head, "tail": _tail, "dense": _dense, "attention_router": _attention_router,
                 "shared": _shared, "residual": _residual, "predict_next": _predict_next}


class _StepBuffers:
    """Static buffers and segments of one (B, Q, logits kept) step shape."""

    def __init__(self, decoder: "FastDecoder", batch: int, tokens: int, keep: int, mask: torch.Tensor):
        model = decoder.model()
        dev, dtype = decoder.device, decoder.dtype
        cfg, base = model.config, model.get_decoder()
        hidden, top_k, num_experts = decoder.adapter.hidden_size, decoder.adapter.top_k, decoder.adapter.num_experts
        t = batch * tokens
        self.batch, self.tokens, self.keep = batch, tokens, keep
        self.input_ids = torch.zeros(batch, tokens, dtype=torch.long, device=dev)  # [B, Q]
        self.position_ids = torch.zeros(batch, tokens, dtype=torch.long, device=dev)  # [B, Q]
        self.mask = torch.zeros_like(mask)  # [B, 1, Q, L] as transformers builds it (bool or additive)
        self.h = torch.zeros(batch, tokens, hidden, dtype=dtype, device=dev)  # [B, Q, H] residual stream
        self.resid = torch.zeros_like(self.h)  # [B, Q, H] after attention + residual
        self.x = torch.zeros(t, hidden, dtype=dtype, device=dev)  # [T, H] MoE input
        self.ids = torch.zeros(t, top_k, dtype=torch.long, device=dev)  # [T, K]
        self.weights = torch.zeros(t, top_k, dtype=torch.float32, device=dev)  # [T, K]
        self.pred = torch.zeros(t, top_k, dtype=torch.long, device=dev)  # [T, K]
        self.y = torch.zeros(t, hidden, dtype=dtype, device=dev)  # [T, H] routed experts' output
        self.s = torch.zeros(t, hidden, dtype=dtype, device=dev)  # [T, H] shared experts' output
        # Recorded behind A's host copies: the host waits on it, not on the shared experts queued after.
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None
        self.predicted = torch.cuda.Event() if dev.type == "cuda" else None  # behind P's host copy
        self.logits = torch.zeros(batch, keep, cfg.vocab_size, dtype=dtype, device=dev)  # [B, keep, V]
        pe = base.rotary_emb(self.h, self.position_ids)  # rotary (cos, sin) or whatever the model returns
        self.pe = tuple(p.clone() for p in pe) if isinstance(pe, tuple) else pe.clone()  # static
        on_cuda = dev.type == "cuda"
        if on_cuda:
            def pinned(like):
                return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        else:  # host tensors are the device tensors: nothing to copy
            def pinned(like):
                return like
        # x, pred and the CPU partial serve one layer at a time; ids and weights are per layer.
        x_host, pred_host = pinned(self.x), pinned(self.pred)
        cpu_out = torch.empty(t, hidden, dtype=torch.float32, pin_memory=on_cuda)  # [T, H]
        cache = decoder.cache.cache
        warmup = 2 if decoder.compile_backend else 1

        def seg(name, fn):
            return Segment(name, fn, capture=decoder.capture, pool=decoder.pool, warmup=warmup)

        def device_part(kind, *args):  # device-only work of one kind, compiled once per kind when compiling
            return functools.partial(decoder.device_fn(kind), self, *args)

        self._head_fn, self._tail_fn = device_part("head", base), device_part("tail", model, keep)
        self.head, self.tail = seg("head", self._head_fn), seg("tail", self._tail_fn)
        self.layers: list[Segment | _MoeSegments] = []  # per decoder layer: dense layers are one segment
        for index, layer in enumerate(base.layers[: cfg.num_hidden_layers]):
            block = layer.mlp
            if not hasattr(block, "moe_index"):
                self.layers.append(seg(f"dense{index}", device_part("dense", layer, cache, decoder.cache_arg)))
                continue
            hosts = tuple(HostStep(x=x_host, ids=pinned(self.ids), weights=pinned(self.weights), cpu_out=cpu_out)
                          for _ in range(2))

            def a(device_fn, host=hosts[0], to_host=("x", "ids", "weights")):
                device_fn()
                if decoder.uniform_routing:  # benchmark-only (FastDecoder.uniform_routing)
                    self.ids.copy_(torch.rand(t, num_experts, device=dev).topk(top_k, dim=-1).indices)
                    self.weights.fill_(1.0 / top_k)
                if on_cuda:  # outside the compiled part: device -> pinned host copies
                    for name in to_host:
                        getattr(host, name).copy_(getattr(self, name), non_blocking=True)

            def p(device_fn):
                device_fn()
                if on_cuda:
                    pred_host.copy_(self.pred, non_blocking=True)

            def b(block=block):
                decoder.runtime.moe_kernel(block.moe_index, self.x, self.ids, self.weights, out=self.y)

            def e_cpu(has_shared=bool(block.adapter.shared_modules)):
                y = merge_cpu_partial(self.y, cpu_out)  # [T, H]
                if has_shared:
                    y = y + self.s
                self.h.copy_(self.resid + y.view(self.h.shape))

            # P exists where there is a next MoE layer; whether it runs follows the policy (a hot swap
            # may turn lookahead on or off between steps).
            ahead = None
            if block.next_gate is not None:
                ahead = seg(f"P{index}", functools.partial(p, device_part("predict_next", block)))
            has_shared = bool(block.adapter.shared_modules)
            run_a = functools.partial(a, device_part("attention_router", layer, block, cache, decoder.cache_arg))
            self.layers.append(_MoeSegments(
                block, hosts, run_a, seg(f"A{index}", run_a),
                seg(f"S{index}", device_part("shared", block)) if has_shared else None,
                seg(f"B{index}", b), seg(f"E{index}", device_part("residual", has_shared)), seg(f"Ecpu{index}", e_cpu),
                ahead))
        self.pred_host = pred_host  # [T, K] the last P's predicted ids
        # Whole-step graphs (one launch per step) for steps that need no host decision between layers.
        # "resident" has one graph per host set; done[i] marks the end of the last replay of resident[i].
        self.whole = {"resident": [seg(f"step{i}", functools.partial(self._whole_step, routed=True, hosts=i))
                                   for i in range(2)],
                      "skip_routed": [seg("step-dense", functools.partial(self._whole_step, routed=False))]}
        self.done = [torch.cuda.Event() if on_cuda else None for _ in range(2)]
        self.parity = 0  # the host set of the next whole step

    def _whole_step(self, routed: bool, hosts: int = 0) -> None:
        """A whole decode step with no host sync: every MoE layer runs A, S, B (when ``routed``) and E.

        Only what the engine's accounting reads goes to the host (set ``hosts``): the routing, when the
        routed experts run. Every copy is a graph node the step waits on (a few microseconds each).
        """
        self._head_fn()
        for entry in self.layers:
            if isinstance(entry, Segment):
                entry.fn()
                continue
            entry.run_a(host=entry.hosts[hosts], to_host=("ids", "weights") if routed else ())
            if entry.shared is not None:
                entry.shared.fn()
            if routed:
                entry.b.fn()
            entry.e.fn()
        self._tail_fn()

    def segments(self):
        yield self.head
        yield self.tail
        for graphs in self.whole.values():
            yield from graphs
        for entry in self.layers:
            yield from entry.segments() if isinstance(entry, _MoeSegments) else (entry,)


class FastDecoder:
    """Runs decode steps of one loaded model through segments over a static KV cache."""

    def __init__(self, model, adapter: MoeAdapter, runtime: OffloadRuntime, *, max_context: int,
                 max_batch: int, device: torch.device, dtype: torch.dtype, compile_backend: str | None = None):
        self.model = weakref.ref(model)  # the model holds the decoder (through its handle)
        self.adapter = adapter
        self.runtime = runtime
        self.device, self.dtype = device, dtype
        try:  # the KV-cache argument name of this transformers (None: the fast path cannot run)
            self.cache_arg: str | None = fast_path_contract(model)
        except TransformersMismatch:
            self.cache_arg = None  # unsupported_reason() says why when the fast path is switched on
        self.cache = DecodeCache(model.config, max_context, max_batch)
        self.mask = DecodeMask(self.cache, self.cache_arg)
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._compile_backend = compile_backend
        self._device_fns: dict[str, object] = {}
        self.enabled = False
        self.off_reason: str | None = "not switched on"  # why decode steps do not take the fast path
        self.fallback_steps = 0  # decode steps over moerun's cache that ran through transformers anyway
        self._skip_routed = False
        self._uniform_routing = False
        self.profile: DecodeProfile | None = None
        self.fast_steps = 0
        self.whole_steps = 0  # fast steps run as one graph (no expert could miss)
        self._pending: tuple[_StepBuffers, int] | None = None  # a whole step whose routing the engine has not read
        self._shapes: dict[tuple[int, int, int], _StepBuffers] = {}
        self._notified: set[str] = set()
        self._forwards_over_cache = 0  # forward() calls that got moerun's cache during one generate()

    @property
    def compile_backend(self) -> str | None:
        """torch.compile backend of the segments' device parts ("inductor", or "eager" to trace only),
        or None (no compiling). Setting it rebuilds the segments at the next step."""
        return self._compile_backend

    @compile_backend.setter
    def compile_backend(self, backend: str | None) -> None:
        if backend != self._compile_backend:
            self._compile_backend = backend
            self._device_fns.clear()
            self._shapes.clear()

    def device_fn(self, kind: str):
        """The device part of one kind of segment (``_DEVICE_PARTS``), compiled once for every layer
        and step shape when the decoder compiles."""
        fn = self._device_fns.get(kind)
        if fn is None:
            fn = _DEVICE_PARTS[kind]
            if self.compile_backend:
                fn = compiled(fn, self.compile_backend)
            self._device_fns[kind] = fn
        return fn

    # -- switch ---------------------------------------------------------------------------------
    def set_enabled(self, enabled: bool) -> bool:
        """Turn the fast path on or off; on is refused (with a one-line notice) where unsupported."""
        reason = None if enabled else "switched off (fast_decode=False)"
        if enabled:
            reason = unsupported_reason(self.model())
            if reason is not None:
                _notice(f"fast decode path off for this model: {reason}; decoding runs through transformers' layers")
                enabled = False
        self.enabled, self.off_reason = enabled, reason
        return enabled

    @property
    def skip_routed_experts(self) -> bool:
        """Benchmark-only switch: MoE layers skip their routed experts (no sync, no plan, no kernel;
        the routed output is zero), so a step times the dense part alone. Tokens are not the model's."""
        return self._skip_routed

    @skip_routed_experts.setter
    def skip_routed_experts(self, skip: bool) -> None:
        self._skip_routed = bool(skip)
        for buf in self._shapes.values():
            buf.y.zero_()

    @property
    def uniform_routing(self) -> bool:
        """Benchmark-only switch: every MoE layer's experts are drawn uniformly at random per token
        (K distinct, equal gate weights) instead of by its router, on the device inside the step, so
        the engine, copies and CPU experts see the worst case for any cache (random-weight
        checkpoints route far from uniformly). Tokens are not the model's."""
        return self._uniform_routing

    @uniform_routing.setter
    def uniform_routing(self, uniform: bool) -> None:
        if bool(uniform) != self._uniform_routing:
            self._uniform_routing = bool(uniform)
            self._shapes.clear()  # their graphs were captured with the other routing

    def stats(self) -> dict:
        """Fast-path steps (and how many ran as one whole-step graph), graphs captured and replayed,
        segments run eagerly."""
        segs = [s for buf in self._shapes.values() for s in buf.segments()]
        return {"enabled": self.enabled, "off_reason": self.off_reason, "fast_steps": self.fast_steps,
                "fallback_steps": self.fallback_steps, "whole_steps": self.whole_steps,
                "graphs": sum(s.graph is not None for s in segs),
                "graph_replays": sum(s.replays for s in segs),
                "eager_segment_calls": sum(s.calls - s.replays for s in segs),
                "kv_cache_bytes": self.cache.nbytes()}

    # -- generate / forward hooks -----------------------------------------------------------------
    def start_generation(self, batch_size: int):
        """The static cache, emptied, for a generation of ``batch_size`` sequences."""
        cache, replaced = self.cache.start(batch_size)
        self.mask.reset()
        if replaced:
            self._shapes.clear()  # their segments were built over the previous cache
        return cache

    def _takes(self, args, kwargs) -> bool:
        """Whether this forward call over moerun's cache is a decode step the fast path runs. A decode
        step it cannot run is counted (``fallback_steps``), with a one-time notice saying why."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not self.enabled or ids is None or ids.dim() != 2 or ids.shape[0] != self.cache.batch_size:
            return False
        # Prefill (the first forward of a generation) runs through transformers.
        if not (1 <= ids.shape[1] <= MAX_STEP_TOKENS and self.cache.length > ids.shape[1]):
            return False
        reason = None
        if torch.is_grad_enabled():
            reason = "gradients are enabled"
        elif args:
            reason = "forward() got positional arguments"
        elif set(kwargs) - _STEP_ARGS - {self.cache_arg}:
            reason = f"forward() got argument(s) {sorted(set(kwargs) - _STEP_ARGS - {self.cache_arg})}"
        elif any(kwargs.get(f) for f in ("output_attentions", "output_hidden_states", "output_router_logits")):
            reason = "attentions, hidden states or router logits were asked for"
        elif kwargs.get("return_dict") is False or kwargs.get("use_cache") is False:
            reason = "return_dict=False or use_cache=False"
        elif not isinstance(kwargs.get("logits_to_keep", 0), int):  # index tensors: transformers slices them
            reason = "logits_to_keep is an index tensor"
        if reason is None:
            return True
        self.fallback_steps += 1
        self._notice_once(f"fallback:{reason}", f"decode steps run through transformers' layers: {reason}")
        return False

    def install(self, model) -> None:
        """Route the model's decode steps and generate() through this decoder."""
        original_forward, original_generate = type(model).forward, type(model).generate
        model_ref, decoder = weakref.ref(model), self

        def forward(*args, **kwargs):
            if decoder.cache.owns(kwargs.get(decoder.cache_arg)):
                decoder._forwards_over_cache += 1
                tokens = kwargs.get("input_ids", args[0] if args else None)
                if tokens is None:
                    tokens = kwargs["inputs_embeds"]
                decoder.cache.advance(tokens.shape[1])  # raises before a write past max_context
                if decoder._takes(args, kwargs):
                    return decoder.step(**kwargs)
            decoder.flush_accounting()  # the engine sees the steps in order
            return original_forward(model_ref(), *args, **kwargs)

        def generate(*args, **kwargs):
            if not decoder.enabled:
                return original_generate(model_ref(), *args, **kwargs)
            # The cache and the step buffers outlive this call and are updated in place by later ones:
            # they must not become inference tensors (generate itself runs under no_grad).
            with torch.inference_mode(False):
                cache = decoder._cache_for_generate(model_ref(), args, kwargs)
                if cache is not None:
                    kwargs[decoder.cache_arg] = cache
                    kwargs.setdefault("disable_compile", True)  # transformers would torch.compile a static-cache run
                decoder._forwards_over_cache = 0
                try:
                    return original_generate(model_ref(), *args, **kwargs)
                finally:
                    decoder.flush_accounting()
                    if cache is not None and decoder._forwards_over_cache == 0:
                        # generate() never handed moerun's cache to forward(): its plumbing changed.
                        decoder.off_reason = mismatch(
                            f"did not pass the KV cache given to generate() as {decoder.cache_arg!r} on to "
                            "forward()").args[0]
                        decoder._notice_once("lost-cache", f"fast decode path not used: {decoder.off_reason}")

        # generate() asks the model for its static-cache masks by this name before every step.
        own_masks = inspect.getattr_static(type(model), "create_masks_for_generate", None)

        def original_masks(*args, **kwargs):
            if own_masks is None:
                return create_masks_for_generate(*args, **kwargs)
            return own_masks.__get__(model_ref(), type(model_ref()))(*args, **kwargs)

        def create_masks(*args, **kwargs):
            if not decoder.enabled:
                return original_masks(*args, **kwargs)
            return decoder.mask.build(original_masks, *args, **kwargs)

        model.create_masks_for_generate = create_masks
        forward.__signature__ = inspect.signature(model.forward)  # generate inspects forward's arguments
        forward.__doc__ = original_forward.__doc__
        generate.__signature__ = inspect.signature(model.generate)
        generate.__doc__ = original_generate.__doc__
        model.forward, model.generate = forward, generate

    def _cache_for_generate(self, model, args, kwargs):
        if not self.enabled or kwargs.get(self.cache_arg) is not None or kwargs.get("use_cache") is False:
            return None
        config = kwargs.get("generation_config") or model.generation_config
        if any(k in kwargs for k in ("assistant_model", "prompt_lookup_num_tokens")) or \
                getattr(config, "cache_implementation", None) is not None:
            return None
        if (kwargs.get("num_beams") or config.num_beams or 1) != 1:
            self._notice_once("beams", "beam search runs through transformers' layers (the fast path decodes "
                                       "one hypothesis per sequence)")
            return None
        inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs", kwargs.get("inputs_embeds")))
        if inputs is None:
            return None
        batch = inputs.shape[0] * (kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        if not self.cache.fits(batch):
            self._notice_once(f"batch{batch}", f"a batch of {batch} sequences is more than max_batch="
                                               f"{self.cache.max_batch}: it decodes through transformers' layers "
                                               "(load with a larger max_batch for the fast path)")
            return None
        return self.start_generation(batch)

    def _notice_once(self, key: str, message: str) -> None:
        if key not in self._notified:
            self._notified.add(key)
            _notice(message)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, *, input_ids: torch.Tensor, attention_mask=None, position_ids=None,
             logits_to_keep: int = 0, **flags) -> CausalLMOutputWithPast:
        """One decode step of ``input_ids`` ``[B, Q]`` (already counted in the cache length); the KV
        cache comes under its transformers name (``self.cache_arg``) among ``flags``."""
        past_key_values = flags[self.cache_arg]
        batch, tokens = input_ids.shape
        start = self.cache.length - tokens  # positions written before this step
        if position_ids is None:
            position_ids = torch.arange(start, start + tokens, device=input_ids.device).expand(batch, tokens)
        mask = self._mask(input_ids, attention_mask, past_key_values, position_ids)
        keep = min(logits_to_keep, tokens) if logits_to_keep > 0 else tokens  # 0 keeps every position
        buf = self._shapes.get((batch, tokens, keep))
        if buf is None or buf.mask.shape != mask.shape or buf.mask.dtype != mask.dtype:
            buf = self._shapes[(batch, tokens, keep)] = _StepBuffers(self, batch, tokens, keep, mask)
        buf.input_ids.copy_(input_ids)
        buf.position_ids.copy_(position_ids)
        buf.mask.copy_(mask)
        self._run(buf)
        self.fast_steps += 1
        return CausalLMOutputWithPast(logits=buf.logits.clone(), **{self.cache_arg: past_key_values})

    def _mask(self, input_ids, attention_mask, cache, position_ids) -> torch.Tensor:
        """The 4-D mask ``[B, 1, Q, L]`` transformers' attention expects (generate builds it for
        static caches; otherwise built here with the same function)."""
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask["full_attention"]
        if attention_mask is None or attention_mask.dim() == 2:
            from transformers.masking_utils import create_masks_for_generate

            model = self.model()
            batch, tokens = input_ids.shape
            attention_mask = create_masks_for_generate(
                config=model.config, inputs_embeds=torch.empty((batch, tokens, 0), dtype=self.dtype,
                                                               device=input_ids.device),
                attention_mask=attention_mask, position_ids=position_ids, **{self.cache_arg: cache})
            if isinstance(attention_mask, dict):
                attention_mask = attention_mask["full_attention"]
        if attention_mask is None or attention_mask.dim() != 4:
            raise RuntimeError("the fast decode path needs transformers' 4-D attention mask for a static cache; "
                               "turn it off with model.moerun.fast_decode = False")
        return attention_mask

    def _run(self, buf: _StepBuffers) -> None:
        prof, runtime = self.profile, self.runtime
        if prof:
            prof.begin_step()
        whole = True
        if self.skip_routed_experts:  # benchmark-only: no sync, no plan, y stays zero
            self.flush_accounting()
            buf.whole["skip_routed"][0]()
            self.whole_steps += 1
        elif runtime.all_resident():
            # No expert can miss, so no layer needs a host decision before its kernel: the step is one
            # graph. The engine reads every layer's routing one step later (same accesses, same order),
            # on the host while the next step's graph runs on the GPU.
            hosts, buf.parity = buf.parity, buf.parity ^ 1
            buf.whole["resident"][hosts]()
            if buf.done[hosts] is not None:
                buf.done[hosts].record(torch.cuda.current_stream(self.device))
            self.flush_accounting()
            self._pending = (buf, hosts)
            self.whole_steps += 1
        else:
            self.flush_accounting()
            self._run_layers(buf, prof)
            whole = False
        if prof:
            prof.end_step(whole)

    def flush_accounting(self) -> None:
        """Let the engine read the routing of the last whole step, if not yet read (the handle calls
        this before statistics, policy swaps and traces are read, and generate() at its end)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        buf, hosts = pending
        if buf.done[hosts] is not None:
            buf.done[hosts].synchronize()
        for entry in buf.layers:
            if isinstance(entry, _MoeSegments):
                host = entry.hosts[hosts]
                host.started_at = time.perf_counter()
                self.runtime.account(entry.block.moe_index, host)

    def _run_layers(self, buf: _StepBuffers, prof: DecodeProfile | None) -> None:
        """A step with one host sync per MoE layer: the engine plans each layer between A and B."""
        runtime = self.runtime
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        buf.head()
        predicted_for = None  # the MoE layer whose experts the last P predicted
        for entry in buf.layers:
            if isinstance(entry, Segment):  # a dense decoder layer
                entry()
                continue
            block = entry.block
            layer = block.layer
            t0 = time.perf_counter()
            a0 = prof.now() if prof else None
            entry.a()
            a1 = prof.now() if prof else None
            if stream is not None:
                buf.copied.record(stream)
            if predicted_for is not None:  # lookahead: prefetch while A runs
                if stream is not None:
                    buf.predicted.synchronize()
                runtime.prefetch_ahead(predicted_for, buf.pred_host)
                predicted_for = None
            if entry.shared is not None:
                entry.shared()  # the GPU runs the shared experts while the host waits and plans
            a2 = prof.now() if prof else None
            t_sync = time.perf_counter()
            if stream is not None:
                buf.copied.synchronize()  # the layer's one host sync: A's copies are in the pinned buffers
            t_plan = time.perf_counter()
            host = entry.hosts[0]
            host.started_at = t0
            step = runtime.begin(block.moe_index, host)
            p1 = prof.now() if prof else None
            if prof:
                prof.host_span(layer, "sync", t_sync, until_s=t_plan)
                plan_ms = prof.host_span(layer, "plan", t_plan)
            entry.b()
            b1 = prof.now() if prof else None
            runtime.after_kernel(step)
            if step.cpu_experts:
                t_cpu = time.perf_counter()
                runtime.wait_cpu(step)
                if prof:
                    prof.host_span(layer, "cpu_wait", t_cpu)
                e0 = prof.now() if prof else None
                entry.e_cpu()
            else:
                e0 = prof.now() if prof else None
                entry.e()
            if runtime.lookahead and entry.ahead is not None:
                entry.ahead()
                if stream is not None:
                    buf.predicted.record(stream)
                predicted_for = block.next_moe_index
            if prof:
                e1 = prof.now()
                prof.device_span(layer, "graph_a", a0, a1)
                prof.device_span(layer, "copies_wait", a1, p1, minus_ms=plan_ms)
                prof.device_span(layer, "graph_b", a1, a2)  # the shared experts
                prof.device_span(layer, "graph_b", p1, b1)
                prof.device_span(layer, "graph_b", e0, e1)
            runtime.finish(step)
        buf.tail()
