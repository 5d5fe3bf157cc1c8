"""Where the fast decode path meets transformers: the model's forward/generate hooks and what it can run.

``install(decoder, model)`` replaces three attributes of the loaded model:

- ``forward``: a batch of more than ``max_batch`` sequences is refused (:class:`BatchOverflowError`)
  before anything runs; a call over moerun's static KV cache is counted against ``max_context`` first (a step
  past it raises before anything is written); a decode step the fast path can run
  (:func:`takes_step`) goes to ``decoder.step``; everything else (prefill, unsupported arguments)
  to transformers' own forward, a prefill of more tokens than the memory plan's ``prefill_chunk`` as
  several forwards over the same KV cache (:func:`forward_in_chunks`, the one place prompts are chunked);
- ``generate``: refuses, before the prefill, a generation whose sequences (prompts x return sequences
  or beams) exceed ``max_batch`` or whose prompt and ``max_new_tokens`` would not fit ``max_context``
  (:func:`check_generation`); hands generate() moerun's static cache when the caller passes none
  (:func:`cache_for_generate`), and moerun's decoding loop (decode_loop.py) as its ``custom_generate``
  where that loop can run the call; afterwards it checks that forward() actually received the cache (a
  transformers whose plumbing moved would otherwise decode through its own layers unnoticed);
- ``create_masks_for_generate``: generate's static-cache masks, extended on the device step by step
  (decode_cache.DecodeMask).

:func:`unsupported_reason` says why a model cannot take the fast path at all. The transformers
internals relied on here are checked in transformers_contract. This module knows nothing about graphs,
experts or the policy.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_masks_for_generate

from ..transformers_contract import TransformersMismatch, fast_path_contract, mismatch
from . import decode_loop
from .decode_cache import ContextOverflowError, masks_by_kind

if TYPE_CHECKING:
    from .fast_decode import FastDecoder

# Tokens per sequence step the fast path takes (the fused kernel's decode path covers them;
# memory.py reserves room for a step of max_batch x this many tokens).
MAX_STEP_TOKENS = 16
# The decoder-layer structure the segments reproduce (pre-norm: attention then MLP, each with a residual).
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
# Attention layer kinds (config.layer_types) the fast path runs: each gets its mask from step_masks.
LAYER_TYPES = ("full_attention", "sliding_attention")
# forward() arguments a decode step may carry besides the KV cache (whose name depends on the transformers
# version: transformers_contract); any other argument (or a true output_* flag) goes to transformers.
_STEP_ARGS = {"input_ids", "position_ids", "attention_mask", "use_cache", "logits_to_keep",
              "return_dict", "output_attentions", "output_hidden_states", "output_router_logits"}


class BatchOverflowError(ValueError):
    """A call would run more sequences at once than the ``max_batch`` the model was loaded with (what the
    memory plan reserved KV cache and activations for)."""


def check_batch(rows: int, max_batch: int, what: str) -> None:
    """BatchOverflowError when ``rows`` sequences (``what``: how they come about) exceed ``max_batch``."""
    if rows > max_batch:
        raise BatchOverflowError(
            f"{what} would run {rows} sequences at once, but the model was loaded with max_batch={max_batch} "
            "(the memory plan reserves KV cache and activations for no more). Load it with a larger max_batch "
            f"(moerun.load(..., max_batch={rows}); the KV reserve grows with it), or pass at most {max_batch} "
            "sequences per call.")


def _generation_inputs(args, kwargs):
    """The prompt tensor of a generate() call (``[B, S]`` ids or ``[B, S, H]`` embeddings), or None."""
    if args:
        return args[0]
    for name in ("input_ids", "inputs", "inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def generation_rows(model, args, kwargs) -> int | None:
    """Sequences a generate() call runs at once: prompts x return sequences (x beams under beam search,
    whose hypotheses are sequences of their own); None when the call names no prompt tensor."""
    inputs = _generation_inputs(args, kwargs)
    if not torch.is_tensor(inputs) or inputs.dim() < 2:
        return None
    config = kwargs.get("generation_config") or model.generation_config
    returned = kwargs.get("num_return_sequences") or config.num_return_sequences or 1
    beams = kwargs.get("num_beams") or config.num_beams or 1
    return inputs.shape[0] * max(returned, beams)


def check_generation(model, max_batch: int, max_context: int, args, kwargs) -> None:
    """Refuse, before the prefill, a generate() call that cannot fit what the model was loaded for: more
    sequences than ``max_batch`` (BatchOverflowError), or a prompt whose ``max_new_tokens`` (or
    ``max_length``) given with the call (as an argument or in its ``generation_config``) would write more
    than ``max_context`` KV positions per sequence (ContextOverflowError). N new tokens write prompt +
    N - 1 positions: the last token is never fed back."""
    rows = generation_rows(model, args, kwargs)
    if rows is None:
        return
    inputs = _generation_inputs(args, kwargs)
    batch, prompt = inputs.shape[0], inputs.shape[1]
    each = f" x {rows // batch} return sequences or beams each" if rows != batch else ""
    check_batch(rows, max_batch, f"this generate() call ({batch} prompts{each})")
    # Only a length the call asks for is checked up front: the model's own generation config often names
    # one far beyond any loaded max_context (32768), which generations end long before by end of sequence;
    # such a generation that does run past max_context still stops at the step that would (DecodeCache.advance).
    config = kwargs.get("generation_config")
    new = kwargs["max_new_tokens"] if "max_new_tokens" in kwargs else getattr(config, "max_new_tokens", None)
    length = kwargs["max_length"] if "max_length" in kwargs else getattr(config, "max_length", None)
    if isinstance(new, int):
        total, asked = prompt + new, f"a prompt of {prompt} + max_new_tokens={new}"
    elif isinstance(length, int):
        total, asked = length, f"max_length={length} (a prompt of {prompt} and the tokens generated)"
    else:
        return  # transformers refuses such a call itself
    positions = max(prompt, total - 1)
    if positions > max_context:
        raise ContextOverflowError(
            f"this generation would hold up to {positions} tokens per sequence ({asked}, the last token never "
            f"fed back), but the model was loaded with max_context={max_context} (prompt + generated; the "
            "memory plan reserves no more). Load the model with a larger max_context (moerun.load(..., "
            "max_context=N); the KV reserve grows with it), or shorten the prompt or max_new_tokens. Nothing "
            "was run.")


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
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - set(LAYER_TYPES))
        if other:
            return f"attention layer types {other} (the fast path covers {' and '.join(LAYER_TYPES)})"
        if "sliding_attention" in layer_types and not isinstance(getattr(cfg, "sliding_window", None), int):
            return "sliding-window layers without an int config.sliding_window"
    elif getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention without config.layer_types (the fast path reads each layer's kind there)"
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


def takes_step(decoder: "FastDecoder", args, kwargs) -> bool:
    """Whether this forward call over moerun's cache is a decode step the fast path runs. A decode
    step it cannot run is counted (``fallback_steps``), with a one-time notice saying why."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not decoder.enabled or ids is None or ids.dim() != 2 or ids.shape[0] != decoder.cache.batch_size:
        return False
    # Prefill (the first forward of a generation) runs through transformers.
    if not (1 <= ids.shape[1] <= MAX_STEP_TOKENS and decoder.cache.length > ids.shape[1]):
        return False
    unknown = set(kwargs) - _STEP_ARGS - {decoder.cache_arg}
    reason = None
    if torch.is_grad_enabled():
        reason = "gradients are enabled"
    elif args:
        reason = "forward() got positional arguments"
    elif unknown:
        reason = f"forward() got argument(s) {sorted(unknown)}"
    elif any(kwargs.get(f) for f in ("output_attentions", "output_hidden_states", "output_router_logits")):
        reason = "attentions, hidden states or router logits were asked for"
    elif kwargs.get("return_dict") is False or kwargs.get("use_cache") is False:
        reason = "return_dict=False or use_cache=False"
    elif not isinstance(kwargs.get("logits_to_keep", 0), int):  # index tensors: transformers slices them
        reason = "logits_to_keep is an index tensor"
    if reason is None:
        return True
    decoder.fallback_steps += 1
    decoder.notice_once(f"fallback:{reason}", f"decode steps run through transformers' layers: {reason}")
    return False


# forward() arguments a chunked prefill knows how to split (see forward_in_chunks); with any other (or a
# true output_* flag, labels) the prefill runs as one forward.
_CHUNK_ARGS = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "use_cache", "logits_to_keep",
               "return_dict", "output_attentions", "output_hidden_states", "output_router_logits"}


def chunk_length(model, cache_arg: str, args, kwargs) -> int | None:
    """Tokens per sequence of each chunk this forward's prefill runs in, or None for one forward: the
    plan's ``prefill_chunk`` (tokens of all sequences together) divided among the batch, when the call
    has more tokens than that and carries a KV cache the chunks can fill in turn."""
    handle = getattr(model, "moerun", None)
    limit = getattr(getattr(handle, "plan", None), "prefill_chunk", 0)
    tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if not limit or args or tokens is None or tokens.shape[0] * tokens.shape[1] <= limit:
        return None
    mask = kwargs.get("attention_mask")
    masks = mask.values() if isinstance(mask, dict) else [mask]
    if (not isinstance(kwargs.get(cache_arg), Cache) or kwargs.get("use_cache") is False
            or kwargs.get("return_dict") is False or set(kwargs) - _CHUNK_ARGS - {cache_arg}
            or any(kwargs.get(f) for f in ("output_attentions", "output_hidden_states", "output_router_logits"))
            or not isinstance(kwargs.get("logits_to_keep", 0), int)
            or any(m is not None and not (torch.is_tensor(m) and m.dim() in (2, 4)) for m in masks)):
        return None
    return max(1, limit // tokens.shape[0])


def forward_in_chunks(forward, cache_arg: str, chunk: int, kwargs):
    """``forward(**kwargs)`` of a prefill over ``S`` tokens per sequence as forwards over ``chunk``
    tokens each, in order, over the same KV cache: each chunk's tokens attend to the cache the chunks
    before it wrote and to themselves, as the rows of one forward would, so the cache and the logits are
    those of one forward. Split along the sequence axis: the tokens, their positions (given, or the
    cache's length onwards, as the model computes them), a 4-D mask's query rows ``[B, 1, S, L]``, a 2-D
    mask's columns up to the chunk's end; ``logits_to_keep`` keeps the same last positions. The output is
    the last chunk's with every chunk's kept logits concatenated."""
    name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    tokens = kwargs[name]                                   # [B, S] or [B, S, H]
    seq = tokens.shape[1]
    cache = kwargs[cache_arg]
    past = int(cache.get_seq_length())
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(past, past + seq, device=tokens.device).unsqueeze(0)  # [1, S]
    mask = kwargs.get("attention_mask")
    keep = kwargs.get("logits_to_keep", 0)
    first_kept = seq - keep if keep else 0                  # the whole forward's logits cover [first_kept, S)

    def rows(m, start, end):
        if m is None:
            return None
        return m[:, :, start:end] if m.dim() == 4 else m[:, : past + end]

    logits, out = [], None
    for start in range(0, seq, chunk):
        end = min(seq, start + chunk)
        part = dict(kwargs)
        part[name] = tokens[:, start:end]
        part["position_ids"] = positions[..., start:end]
        if mask is not None:
            part["attention_mask"] = ({k: rows(m, start, end) for k, m in mask.items()} if isinstance(mask, dict)
                                      else rows(mask, start, end))
        kept = end - max(start, first_kept)                 # this chunk's positions among the kept ones
        part["logits_to_keep"] = kept if 0 < kept < end - start else (0 if kept > 0 else 1)
        out = forward(**part)
        if kept > 0:
            logits.append(out.logits)
    out.logits = torch.cat(logits, dim=1)
    return out


def cache_for_generate(decoder: "FastDecoder", model, args, kwargs):
    """moerun's static cache, emptied, for a generate() call that can use it; None otherwise."""
    if not decoder.enabled or kwargs.get(decoder.cache_arg) is not None or kwargs.get("use_cache") is False:
        return None
    config = kwargs.get("generation_config") or model.generation_config
    if any(k in kwargs for k in ("assistant_model", "prompt_lookup_num_tokens")) or \
            getattr(config, "cache_implementation", None) is not None:
        return None
    if (kwargs.get("num_beams") or config.num_beams or 1) != 1:
        decoder.notice_once("beams", "beam search runs through transformers' layers (the fast path decodes "
                                     "one hypothesis per sequence)")
        return None
    batch = generation_rows(model, args, kwargs)  # at most max_batch: check_generation ran first
    if batch is None:
        return None
    return decoder.start_generation(batch)


def install(decoder: "FastDecoder", model) -> None:
    """Route the model's decode steps and generate() through ``decoder`` (module docstring)."""
    original_forward, original_generate = type(model).forward, type(model).generate
    model_ref = weakref.ref(model)  # the model holds the decoder (through its handle)
    forwards_over_cache = [0]  # forward() calls that got moerun's cache during one generate()

    def forward(*args, **kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)  # [B, S]
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")                      # [B, S, H]
        if torch.is_tensor(tokens) and tokens.dim() >= 2:
            check_batch(tokens.shape[0], decoder.cache.max_batch, "this forward")
        if decoder.cache.owns(kwargs.get(decoder.cache_arg)):
            forwards_over_cache[0] += 1
            decoder.cache.advance(tokens.shape[1])  # raises before a write past max_context
            if takes_step(decoder, args, kwargs):
                return decoder.step(**kwargs)
        decoder.flush_accounting()  # the engine sees the steps in order
        model = model_ref()
        chunk = chunk_length(model, decoder.cache_arg, args, kwargs)
        if chunk is not None:
            return forward_in_chunks(functools.partial(original_forward, model), decoder.cache_arg, chunk, kwargs)
        return original_forward(model, *args, **kwargs)

    def generate(*args, **kwargs):
        check_generation(model_ref(), decoder.cache.max_batch, decoder.cache.max_context, args, kwargs)
        if not decoder.enabled:
            return original_generate(model_ref(), *args, **kwargs)
        # The cache and the step buffers outlive this call and are updated in place by later ones:
        # they must not become inference tensors (generate itself runs under no_grad).
        with torch.inference_mode(False):
            cache = cache_for_generate(decoder, model_ref(), args, kwargs)
            if cache is not None:
                kwargs[decoder.cache_arg] = cache
                kwargs.setdefault("disable_compile", True)  # transformers would torch.compile a static-cache run
                if decoder.own_loop and decoder.loop_off_reason is None and \
                        decode_loop.unsupported_reason(model_ref(), args, kwargs) is None:
                    kwargs["custom_generate"] = functools.partial(decode_loop.generate_loop, decoder=decoder,
                                                                  streamer=kwargs.get("streamer"))
            forwards_over_cache[0] = 0
            try:
                return original_generate(model_ref(), *args, **kwargs)
            finally:
                decoder.flush_accounting()
                if cache is not None and forwards_over_cache[0] == 0:
                    # generate() never handed moerun's cache to forward(): its plumbing changed.
                    decoder.off_reason = mismatch(
                        f"did not pass the KV cache given to generate() as {decoder.cache_arg!r} on to "
                        "forward()").args[0]
                    decoder.notice_once("lost-cache", f"fast decode path not used: {decoder.off_reason}")

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


def layer_types(config) -> list[str]:
    """Each decoder layer's attention kind (``config.layer_types``; full attention where the config has none)."""
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def step_masks(decoder: "FastDecoder", input_ids, attention_mask, cache, position_ids,
               query_positions) -> dict[str, torch.Tensor]:
    """The 4-D masks ``[B, 1, Q, L]`` transformers' attention expects, by layer kind (generate builds them
    for static caches; otherwise built here with the same function). A sliding-window mask not given is
    made from the full one (decode_cache.sliding_window_mask) with ``query_positions()`` ``[B, Q]``, the
    step's cache positions: the serving engine hands one per-row mask."""
    config = decoder.model().config
    if attention_mask is None or (torch.is_tensor(attention_mask) and attention_mask.dim() == 2):
        batch, tokens = input_ids.shape
        attention_mask = create_masks_for_generate(
            config=config,
            inputs_embeds=torch.empty((batch, tokens, 0), dtype=decoder.dtype, device=input_ids.device),
            attention_mask=attention_mask, position_ids=position_ids, **{decoder.cache_arg: cache})
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 4:
        attention_mask = masks_by_kind(config, attention_mask, query_positions())
    masks = dict(attention_mask) if isinstance(attention_mask, dict) else {"full_attention": attention_mask}
    kinds = set(layer_types(config))
    if any(not torch.is_tensor(masks.get(kind)) or masks[kind].dim() != 4 for kind in kinds):
        raise RuntimeError("the fast decode path needs transformers' 4-D attention mask for a static cache; "
                           "turn it off with model.moerun.fast_decode = False")
    return {kind: masks[kind] for kind in sorted(kinds)}
