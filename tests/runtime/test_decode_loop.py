"""moerun's generate() loop (runtime/decode_loop.py), which reads the stop decision one step late:
the same tokens, scores and streamed values as transformers' loop, with at most one step past a stop
that the stopping criteria (not max_length) decided, and never a step the static cache cannot take.

Tiny fp32 checkpoints on the CPU, through the fast path; every answer is compared with plain
transformers and with the same moerun model running transformers' loop (``generate_loop = False``).
"""
import pytest
import torch
from transformers import AutoModelForCausalLM

import moerun
from moerun import transformers_contract
from moerun.models.synthetic import build_checkpoint, synthetic_config

from generation_helpers import CollectStreamer  # noqa: E402

NEW = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: build_checkpoint(synthetic_config(arch), tmp_path_factory.mktemp(arch), seed=3)
            for arch in ("qwen3_moe", "mixtral")}


def _load(path, **kw):
    kw.setdefault("max_context", 64)
    return moerun.load(path, device="cpu", fast_decode=True, progress=False, **kw)


def _decode(model) -> dict:
    return model.moerun.stats()["decode"]


def _padded_batch():
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))  # [B, S]
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left-padded second row
    return ids, mask


def _eos_within(tokens: torch.Tensor, prompt_len: int, pad: int = 0) -> list[int]:
    """Tokens that, taken as EOS, end every row midway: each row's fourth generated token (or its last
    before padding, where the model's own EOS ended it sooner)."""
    eos = set()
    for row in tokens[:, prompt_len:].tolist():
        generated = row[:row.index(pad)] if pad in row else row
        eos.add(generated[min(3, len(generated) - 1)])
    return sorted(eos)


def test_an_eos_read_one_step_late_gives_transformers_tokens_and_one_extra_step(checkpoints):
    path = checkpoints["qwen3_moe"]
    ids, mask = _padded_batch()
    reference = AutoModelForCausalLM.from_pretrained(path)
    plain = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    eos = _eos_within(reference.generate(ids, **plain), ids.shape[1])
    kw = dict(plain, eos_token_id=eos)
    want = reference.generate(ids, **kw)
    assert want.shape[1] < ids.shape[1] + NEW  # the EOS ended the generation early

    model = _load(path, max_batch=2)
    got = model.generate(ids, **kw)
    assert torch.equal(got, want)
    decode = _decode(model)
    assert decode["loop_generations"] == 1 and decode["loop_extra_steps"] == 1
    generated = want.shape[1] - ids.shape[1]
    assert decode["fast_steps"] == generated - 1 + 1  # every token but the prefill's, and the step past the stop

    model.moerun.generate_loop = False  # transformers' loop over the same fast path
    assert torch.equal(model.generate(ids, **kw), want)
    decode = _decode(model)
    assert decode["loop_generations"] == 1 and decode["loop_off_reason"] == "switched off"
    assert decode["fast_steps"] == generated + (generated - 1)  # no step past the stop this time


def test_max_length_ends_the_loop_without_an_extra_step(checkpoints):
    path = checkpoints["qwen3_moe"]
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    want = AutoModelForCausalLM.from_pretrained(path).generate(ids, **kw)
    model = _load(path, max_batch=2)
    assert torch.equal(model.generate(ids, **kw), want)
    decode = _decode(model)
    assert decode["loop_generations"] == 1 and decode["loop_extra_steps"] == 0
    assert decode["fast_steps"] == NEW - 1 and decode["whole_steps"] == NEW - 1


def test_sampling_logits_processors_and_streaming_match(checkpoints):
    path = checkpoints["mixtral"]
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    reference = AutoModelForCausalLM.from_pretrained(path)
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=20, temperature=0.9, repetition_penalty=1.3,
              pad_token_id=0)
    torch.manual_seed(0)
    eos = _eos_within(reference.generate(prompt, **kw), prompt.shape[1])
    torch.manual_seed(0)
    want = reference.generate(prompt, eos_token_id=eos, **kw)
    model = _load(path)
    for loop in (True, False):
        model.moerun.generate_loop = loop
        streamer = CollectStreamer()
        torch.manual_seed(0)
        got = model.generate(prompt, eos_token_id=eos, streamer=streamer, **kw)
        assert torch.equal(got, want), loop
        # The prompt, then each returned token once (the step past the stop is never streamed), then the end.
        assert streamer.chunks[0] == prompt[0].tolist() and streamer.chunks[-1] == "end"
        assert [c[0] for c in streamer.chunks[1:-1]] == want[0, prompt.shape[1]:].tolist()
    assert _decode(model)["loop_generations"] == 1


def test_scores_and_logits_in_a_dict_answer_match_and_need_no_extra_step(checkpoints):
    # The cache goes back to the caller with a dict answer: the loop then reads each stop at once.
    path = checkpoints["qwen3_moe"]
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(path)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True, output_logits=True)
    eos = _eos_within(reference.generate(prompt, **kw).sequences, prompt.shape[1])
    want = reference.generate(prompt, eos_token_id=eos, **kw)
    model = _load(path)
    got = model.generate(prompt, eos_token_id=eos, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == len(got.logits) == want.sequences.shape[1] - prompt.shape[1]
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
    cache = getattr(got, transformers_contract.cache_argument(model))
    assert model.moerun.decoder.cache.owns(cache)
    decode = _decode(model)
    assert decode["loop_generations"] == 1 and decode["loop_extra_steps"] == 0


def test_a_stop_at_the_end_of_the_cache_is_read_at_once(checkpoints):
    # The static cache holds exactly the tokens up to the EOS: a step past it would not fit.
    path = checkpoints["qwen3_moe"]
    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(path)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    eos = _eos_within(reference.generate(prompt, **kw), prompt.shape[1])
    want = reference.generate(prompt, eos_token_id=eos, **kw)
    model = _load(path, max_context=want.shape[1] - 1)  # the last token is never fed back
    # The length comes only from the generation config, far past max_context and not checked up front,
    # so max_length never forces the read: the full cache alone must make the loop read the EOS at once.
    model.generation_config.max_length = 1000
    assert torch.equal(model.generate(prompt, eos_token_id=eos, do_sample=False, pad_token_id=0), want)
    assert _decode(model)["loop_extra_steps"] == 0


def test_calls_the_loop_cannot_answer_keep_transformers_loop(checkpoints):
    path = checkpoints["mixtral"]
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    reference = AutoModelForCausalLM.from_pretrained(path)
    model = _load(path, max_batch=2)
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_hidden_states=True)
    got = model.generate(prompt, **kw)
    assert torch.equal(got.sequences, reference.generate(prompt, **kw).sequences)
    assert _decode(model)["loop_generations"] == 0


def test_several_sequences_per_prompt_arrive_expanded(checkpoints):
    path = checkpoints["mixtral"]
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=True, num_return_sequences=2)
    torch.manual_seed(0)
    want = AutoModelForCausalLM.from_pretrained(path).generate(prompt, **kw)
    model = _load(path, max_batch=2)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompt, **kw), want)
    decode = _decode(model)
    assert decode["loop_generations"] == 1 and decode["fast_steps"] == 5


def test_a_transformers_without_what_the_loop_calls_keeps_its_own_loop(checkpoints, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    path = checkpoints["mixtral"]
    monkeypatch.delattr(GenerationMixin, "_prefill")
    model = _load(path)  # a transformers whose loop has no _prefill: moerun's loop stays unused
    with pytest.raises(transformers_contract.TransformersMismatch, match=r"has no _prefill\(\)"):
        transformers_contract.check_generate_loop(model)
    monkeypatch.undo()
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    want = AutoModelForCausalLM.from_pretrained(path).generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), want)
    decode = _decode(model)
    assert not model.moerun.generate_loop and decode["loop_generations"] == 0
    assert "has no _prefill()" in decode["loop_off_reason"] and decode["fast_steps"] == 3


@pytest.mark.gpu
def test_on_cuda_the_late_stop_reads_pinned_flags_and_matches_transformers_loop(checkpoints):
    # The flag and the streamed tokens travel through pinned memory behind CUDA events: the same
    # tokens and streamed values as transformers' loop over the same graphs, greedy and sampled.
    path = checkpoints["qwen3_moe"]
    ids, mask = (t.cuda() for t in _padded_batch())
    model = moerun.load(path, device="cuda", dtype=torch.float32, max_context=64, max_batch=2, progress=False)
    plain = dict(attention_mask=mask, max_new_tokens=NEW, pad_token_id=0)
    eos = _eos_within(model.generate(ids, do_sample=False, **plain).cpu(), ids.shape[1])
    for sampling in ({"do_sample": False}, {"do_sample": True, "top_k": 20}):
        answers = []
        for loop in (True, False):
            model.moerun.generate_loop = loop
            streamer = CollectStreamer()
            torch.manual_seed(0)
            out = model.generate(ids, eos_token_id=eos, streamer=streamer, **plain, **sampling)
            answers.append((out.cpu(), streamer.chunks))
        assert torch.equal(answers[0][0], answers[1][0]) and answers[0][1] == answers[1][1], sampling
    decode = _decode(model)
    assert decode["loop_generations"] == 3 and decode["graph_replays"] > 0
