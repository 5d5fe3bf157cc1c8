"""moerun's generate() loop for the fast decode path: greedy and sampled decoding with the stop
decision read one step late, so the host queues step n+1 while the GPU runs step n.

Why: transformers' loop (``GenerationMixin._sample``) asks the device ``unfinished.max() == 0``
after every step. That read waits for the step to finish, so every step's host work (inputs, masks,
logits processors, stopping criteria, the step's own launch; 0.35-0.7 ms per token on the H100,
benchmarks/RESULTS.md "dense-only step") runs while the GPU idles, on top of the step. Here the
flag is copied to pinned memory behind step n and read after step n+1 is queued; the host then runs
at most one step ahead of the GPU (the fast path's whole-step accounting waits on the step before
too), and its work overlaps the device's.

What it runs is transformers' own pieces in transformers' order: ``_prefill``,
``prepare_inputs_for_generation``, the model's forward (moerun's hook, hence the fast path),
``_update_model_kwargs_for_generation``, the logits processors and stopping criteria generate()
prepared, argmax or one multinomial draw, finished rows padded. So the tokens equal transformers'
loop's. It is installed as generate()'s ``custom_generate`` callable (generate_hooks), so every
argument check and preparation before the loop stays transformers'.

The price of reading one step late: when the stopping criteria (an EOS, a stop string, a time
limit) end a generation, one more step has already been queued. Its token, score and logits are
dropped; its KV entry lies past what the next generation overwrites; but the engine saw its routing
(statistics, adapt rules and a recorded trace count one step more than the tokens returned), and a
sampled generation drew one more random number. ``max_length`` ends a generation on the host, with
no extra step; so does a step the static cache could not take (read synchronously instead).

Used only where the answer is a plain sequence or a dict of sequences, scores and logits (no
attentions or hidden states, no beams, no assistant, no synced GPUs; several sequences per prompt
arrive here already expanded by generate()); :func:`unsupported_reason`
says which calls keep transformers' loop. This module knows nothing about graphs or experts.
"""
from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING

import torch
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerateDecoderOnlyOutput

if TYPE_CHECKING:
    from .fast_decode import FastDecoder

# generate() arguments this loop cannot honour; with any of them set, transformers' own loop runs.
_OTHER_LOOPS = ("custom_generate", "assistant_model", "assistant_tokenizer", "prompt_lookup_num_tokens",
                "synced_gpus", "negative_prompt_ids", "guidance_scale")
_NOT_RETURNED = ("output_attentions", "output_hidden_states")


def unsupported_reason(model, args, kwargs) -> str | None:
    """Why this generate() call keeps transformers' loop (one line), or None when moerun's loop runs it.
    The generation mode is read from the call's arguments over the model's generation config, as
    generate() merges them (generate checks them again before the loop starts)."""
    given = [name for name in _OTHER_LOOPS if kwargs.get(name) is not None]
    if given:
        return f"generate() got {given[0]!r}"
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k) and v is not None})
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {mode.value}"
    asked = [name for name in _NOT_RETURNED if getattr(config, name, False)]
    if asked and config.return_dict_in_generate:
        return f"{asked[0]} was asked for"
    return None


class _StopSlot:
    """One step's stop flag (and tokens, for a streamer) copied to the host behind the step."""

    def __init__(self, batch: int, device: torch.device):
        on_cuda = device.type == "cuda"
        self.stop = torch.zeros((), dtype=torch.bool, pin_memory=on_cuda)
        self.tokens = torch.zeros(batch, dtype=torch.long, pin_memory=on_cuda)
        self.event = torch.cuda.Event() if on_cuda else None

    def record(self, unfinished: torch.Tensor, tokens: torch.Tensor | None) -> None:
        self.stop.copy_(unfinished.max() == 0, non_blocking=True)
        if tokens is not None:
            self.tokens.copy_(tokens, non_blocking=True)
        if self.event is not None:
            self.event.record()

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.stop)


def generate_loop(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                  *, decoder: "FastDecoder", streamer=None, **model_kwargs):
    """The decoding loop generate() calls with everything prepared (module docstring): returns what
    transformers' ``_sample`` returns for the same arguments."""
    mode = generation_config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):  # unsupported_reason screened it
        raise RuntimeError(f"moerun's generate loop was handed generation mode {mode.value}; "
                           "turn the fast path off (model.moerun.fast_decode = False) and report this")
    config = generation_config
    wants_dict = config.return_dict_in_generate
    scores = [] if wants_dict and config.output_scores else None
    raw_logits = [] if wants_dict and config.output_logits else None
    pad = config._pad_token_tensor
    has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    max_length = stopping_criteria.max_length
    batch = input_ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)  # [B]
    slots = [_StopSlot(batch, input_ids.device) for _ in range(2)]
    # The cache goes back to the caller with a dict answer: no step past the last token may touch it then.
    defer = not wants_dict
    decoder.loop_generations += 1

    outputs = model._prefill(input_ids, config, model_kwargs, is_first_iteration=True)
    previous: _StopSlot | None = None  # the last step whose flag has not been read
    step = 0
    while True:
        if step:
            inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)  # [B, V]
        del outputs  # the prefill's logits may be large
        step_scores = logits_processor(input_ids, logits)  # [B, V]
        if mode is GenerationMode.SAMPLE:
            tokens = torch.multinomial(torch.softmax(step_scores, dim=-1), num_samples=1).squeeze(1)  # [B]
        else:
            tokens = step_scores.argmax(dim=-1)  # [B]
        if has_eos:  # finished rows continue with padding
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        if scores is not None:
            scores.append(step_scores)
        if raw_logits is not None:
            raw_logits.append(logits)
        unfinished = unfinished & ~stopping_criteria(input_ids, step_scores)
        slot = slots[step % 2]
        slot.record(unfinished, tokens if streamer is not None else None)
        step += 1
        if previous is not None:
            stopped = previous.read()  # the GPU runs this step meanwhile
            if streamer is not None:
                streamer.put(previous.tokens.clone())
            if stopped:  # the step just queued was one too many: drop its token (no scores are kept when deferring)
                decoder.loop_extra_steps += 1
                input_ids = input_ids[:, :-1]
                break
            previous = None
        at_end = max_length is not None and input_ids.shape[1] >= max_length
        cache_full = decoder.cache.length + 1 > decoder.cache.max_context
        if at_end or not defer or cache_full:  # decide now, on this step's flag
            stopped = slot.read()
            if streamer is not None:
                streamer.put(slot.tokens.clone())
            if stopped or at_end:
                break
            continue
        previous = slot
    if streamer is not None:
        streamer.end()
    if not wants_dict:
        return input_ids
    cache = model_kwargs.get(decoder.cache_arg)
    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=tuple(scores) if scores is not None else None,
                                     logits=tuple(raw_logits) if raw_logits is not None else None,
                                     **{_output_cache_field(): cache})


@functools.lru_cache(maxsize=1)
def _output_cache_field() -> str:
    """The name of ``GenerateDecoderOnlyOutput``'s cache field in this transformers."""
    import dataclasses

    from ..transformers_contract import CACHE_ARGUMENT_NAMES

    fields = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return next(name for name in CACHE_ARGUMENT_NAMES if name in fields)
