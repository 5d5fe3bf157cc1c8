"""The continuous-batching engine, driven step by step (no HTTP): requests in rows of the static KV cache
give the tokens single-request generate() gives, whatever joins or leaves around them."""
import threading

import pytest
import torch

from moerun.serve.batching import BatchingEngine, QueueFull, Request, RequestError
from moerun.serve.sampling import SamplingParams
from moerun.serve.text_stream import TextStream

MAX_CONTEXT, MAX_BATCH, EOS = 96, 4, 2


class Recorder:
    """Collects one request's events."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id is not None]

    @property
    def finish(self):
        finals = [e.finish_reason for e in self.events if e.finish_reason is not None]
        assert len(finals) <= 1, f"more than one final event: {self.events}"
        assert not finals or self.events[-1].finish_reason is not None, "events after the final one"
        return finals[0] if finals else None


def _until_idle(engine, limit=2000):
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine did not become idle")


def _expected(reference, prompt, max_tokens):
    """generate()'s tokens cut where the engine stops: after max_tokens, or at (and including) EOS."""
    tokens = reference(prompt, max_tokens)
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.fixture(scope="module", params=["fast", "transformers"])
def model(request, checkpoints, load_model):
    """The model with the fast decode path on (its segments run eagerly on the CPU) or off."""
    return load_model(checkpoints["chat"], fast_decode=request.param == "fast")


def test_concurrent_greedy_requests_match_single_generate(model, reference, prompts):
    engine = BatchingEngine(model)
    batch = prompts(10)
    recorders = [Recorder() for _ in batch]
    for prompt, rec in zip(batch, recorders):
        engine.submit(Request(prompt, 12, rec))
    _until_idle(engine)
    for prompt, rec in zip(batch, recorders):
        assert rec.tokens == _expected(reference, prompt, 12)
        assert rec.finish == ("stop" if rec.tokens[-1] == EOS else "length")
    stats = engine.stats()
    assert stats["decode_path"] == ("fast" if model.moerun.fast_decode else "transformers")
    assert stats["prefills"] == 10 and stats["running"] == stats["waiting"] == 0
    # Four rows at most: ten requests of ~12 tokens take well over the 12 steps of one batch.
    assert stats["decode_steps"] >= 30
    if model.moerun.fast_decode:
        assert model.moerun.stats()["decode"]["kv_cache_bytes"] == model.moerun.plan.kv_cache_bytes
    # generate() takes its cache back and still gives its own tokens; the engine then takes it again.
    out = model.generate(torch.tensor([batch[0]]), max_new_tokens=12, do_sample=False)
    assert out[0, len(batch[0]):].tolist() == reference(batch[0], 12)
    again = Recorder()
    engine.submit(Request(batch[1], 12, again))
    _until_idle(engine)
    assert again.tokens == _expected(reference, batch[1], 12)


def test_interleaved_arrivals_and_departures_lose_or_duplicate_no_token(model, reference, prompts):
    engine = BatchingEngine(model)
    batch = prompts(14, seed=1)
    limits = [3, 17, 1, 9, 25, 5, 12, 2, 30, 7, 11, 4, 19, 6]
    recorders = [Recorder() for _ in batch]
    ids, cancel_at = {}, {4: 8, 8: 3}  # request -> its token count when it is cancelled
    arrivals = iter(range(len(batch)))
    step = 0
    while True:
        if step % 3 == 0:  # a request (sometimes two) arrives every third step
            for i in [next(arrivals, None) for _ in range(1 + (step % 6 == 0))]:
                if i is not None:
                    ids[i] = engine.submit(Request(batch[i], limits[i], recorders[i]))
        for i, at in cancel_at.items():
            if i in ids and len(recorders[i].tokens) >= at and recorders[i].finish is None:
                engine.cancel(ids[i])
        busy = engine.step()
        assert engine.stats()["running"] <= MAX_BATCH
        step += 1
        if not busy and len(ids) == len(batch):
            break
    for i, (prompt, rec) in enumerate(zip(batch, recorders)):
        want = _expected(reference, prompt, limits[i])
        if i in cancel_at and rec.finish == "cancelled":
            assert rec.tokens == want[:len(rec.tokens)] and len(rec.tokens) >= cancel_at[i]
        else:
            assert rec.tokens == want, f"request {i}"
            assert rec.finish in ("stop", "length")
    finished = engine.stats()["finished"]
    assert sum(finished.values()) == len(batch) and finished["error"] == 0


def test_seeded_sampling_draws_the_same_alone_or_in_a_batch(model, prompts):
    engine = BatchingEngine(model)
    batch = prompts(4, seed=2)
    params = SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=11)

    def sampled(neighbours: int) -> list[int]:
        rec = Recorder()
        engine.submit(Request(batch[0], 10, rec, sampling=params, ignore_eos=True))
        for prompt in batch[1:1 + neighbours]:  # greedy and unseeded neighbours
            engine.submit(Request(prompt, 6, Recorder()))
            engine.submit(Request(prompt, 8, Recorder(), sampling=SamplingParams(temperature=1.0)))
        _until_idle(engine)
        return rec.tokens

    alone = sampled(0)
    assert len(alone) == 10
    assert sampled(3) == alone
    other = Recorder()
    engine.submit(Request(batch[0], 10, other, sampling=SamplingParams(temperature=1.3, seed=12), ignore_eos=True))
    _until_idle(engine)
    assert other.tokens != alone  # another seed, another draw (10 tokens from 128)


def test_stop_strings_and_stop_tokens_end_a_request(model, reference, prompts, tokenizer_of):
    tokenizer = tokenizer_of()
    engine = BatchingEngine(model)
    prompt = next(p for p in prompts(20, seed=3) if EOS not in reference(p, 8)[:6])
    want = reference(prompt, 8)
    words = [tokenizer.decode([t]) for t in want]
    stop_word = words[3]
    cut = words.index(stop_word)  # its first occurrence
    by_string, by_token = Recorder(), Recorder()
    engine.submit(Request(prompt, 8, by_string, text=TextStream(tokenizer, [" " + stop_word, "no such text"])))
    engine.submit(Request(prompt, 8, by_token, stop_token_ids=frozenset({want[2]}), text=TextStream(tokenizer)))
    _until_idle(engine)
    assert by_string.finish == "stop" and by_string.tokens == want[:cut + 1]
    assert "".join(e.text for e in by_string.events) == tokenizer.decode(want[:cut])
    assert by_token.finish == "stop" and by_token.tokens == want[:want.index(want[2]) + 1]
    # The stop token's own text is not part of the reply.
    assert "".join(e.text for e in by_token.events) == tokenizer.decode(want[:want.index(want[2])])


def test_logprobs_are_the_model_distribution_of_each_chosen_token(model, prompts):
    engine = BatchingEngine(model)
    prompt = prompts(1, seed=4)[0]
    rec = Recorder()
    engine.submit(Request(prompt, 5, rec, sampling=SamplingParams(temperature=0, logprobs=3), ignore_eos=True))
    engine.submit(Request(prompt, 5, Recorder()))  # a neighbour that asks for none
    _until_idle(engine)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    for event, logits in zip(rec.events, out.logits):
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        assert event.logprob.logprob == pytest.approx(logp[event.token_id].item(), abs=1e-4)
        top = logp.topk(3)
        assert [i for i, _ in event.logprob.top] == top.indices.tolist()
        assert [v for _, v in event.logprob.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_requests_that_cannot_be_served_are_refused_before_they_queue(model):
    engine = BatchingEngine(model)
    with pytest.raises(RequestError, match="maximum context length is 96 tokens.*97 tokens") as err:
        engine.submit(Request([7] * 97, 1, Recorder()))
    assert err.value.param == "messages/prompt"
    with pytest.raises(RequestError, match="at most 6 new tokens fit, but max_tokens is 7") as err:
        engine.submit(Request([7] * 90, 7, Recorder()))
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestError, match="token id 128 is outside this model's vocabulary"):
        engine.submit(Request([7, 128], 1, Recorder()))
    with pytest.raises(RequestError, match="the prompt is empty"):
        engine.submit(Request([], 1, Recorder()))
    assert engine.stats()["submitted"] == 0 and engine.check(90, None) == 6


def test_a_full_queue_refuses_a_request_and_the_queued_ones_complete(model, reference, prompts):
    engine = BatchingEngine(model, max_queue=2)
    batch = prompts(MAX_BATCH + 3, seed=5)
    recorders = [Recorder() for _ in batch]
    for prompt, rec in zip(batch[:-1], recorders):  # free rows, then the queue's two places
        engine.submit(Request(prompt, 5, rec))
    with pytest.raises(QueueFull, match="--max-queue 2"):
        engine.submit(Request(batch[-1], 5, recorders[-1]))
    with pytest.raises(QueueFull):
        engine.check_queue()
    stats = engine.stats()
    assert (stats["rejected"], stats["submitted"], stats["waiting"], stats["max_queue"]) == (2, MAX_BATCH + 2,
                                                                                             MAX_BATCH + 2, 2)
    _until_idle(engine)
    for prompt, rec in zip(batch[:-1], recorders):
        assert rec.tokens == _expected(reference, prompt, 5)
    assert recorders[-1].events == []
    engine.check_queue(MAX_BATCH + 2)  # room again
    with pytest.raises(ValueError, match="max_queue must be >= 0"):
        BatchingEngine(model, max_queue=-1)


def test_a_failed_step_ends_the_running_requests_and_the_engine_goes_on(model, reference, prompts, monkeypatch):
    engine = BatchingEngine(model)
    batch = prompts(2, seed=5)
    failing = [Recorder() for _ in batch]
    for prompt, rec in zip(batch, failing):
        engine.submit(Request(prompt, 6, rec))
    decode = engine._decode

    def broken():
        raise RuntimeError("the device fell over")
    monkeypatch.setattr(engine, "_decode", broken)
    engine.step()
    assert [r.finish for r in failing] == ["error", "error"]
    assert "the device fell over" in failing[0].events[-1].error
    monkeypatch.setattr(engine, "_decode", decode)
    ok = Recorder()
    engine.submit(Request(batch[0], 6, ok))
    _until_idle(engine)
    assert ok.tokens == _expected(reference, batch[0], 6)


def test_without_max_tokens_a_request_fills_the_rest_of_its_row(model):
    engine = BatchingEngine(model)
    rec = Recorder()
    engine.submit(Request([7] * 90, None, rec, ignore_eos=True))
    _until_idle(engine)
    assert len(rec.tokens) == MAX_CONTEXT - 90 and rec.finish == "length"


def test_an_iteration_that_fails_outside_any_request_fails_them_all_and_the_thread_goes_on(model, reference,
                                                                                             prompts, monkeypatch):
    engine = BatchingEngine(model)
    batch = prompts(3, seed=10)
    finished = threading.Semaphore(0)

    def recorder():
        rec = Recorder()
        original = rec.__call__

        def call(event):
            original(event)
            if event.finish_reason is not None:
                finished.release()
        return rec, call

    def take_cache():
        raise RuntimeError("out of device memory")
    monkeypatch.setattr(engine, "_take_cache", take_cache)
    engine.start()
    try:
        failed = [recorder() for _ in batch]
        for prompt, (_, call) in zip(batch, failed):
            engine.submit(Request(prompt, 6, call))
        assert all(finished.acquire(timeout=60) for _ in batch)
        assert all(rec.finish == "error" and "out of device memory" in rec.events[-1].error for rec, _ in failed)
        monkeypatch.undo()
        rec, call = recorder()
        engine.submit(Request(batch[0], 6, call))
        assert finished.acquire(timeout=60)
        assert rec.tokens == _expected(reference, batch[0], 6)
    finally:
        engine.stop(timeout=60)


def test_a_generate_while_serving_ends_the_requests_in_flight_with_an_error(model, reference, prompts):
    engine = BatchingEngine(model)
    batch = prompts(2, seed=6)
    first, second = Recorder(), Recorder()
    engine.submit(Request(batch[0], 20, first))
    engine.step()
    model.generate(torch.tensor([batch[1]]), max_new_tokens=2)
    engine.submit(Request(batch[1], 6, second))
    _until_idle(engine)
    if model.moerun.fast_decode:  # generate() took the static KV cache back: the rows' contents are gone
        assert first.finish == "error"
        assert "model.generate() ran on this model while it was serving" in first.events[-1].error
    else:  # generate() decoded in a cache of its own
        assert first.tokens == _expected(reference, batch[0], 20)
    assert second.tokens == _expected(reference, batch[1], 6)


def test_the_engine_thread_serves_other_threads_and_stop_cancels_the_rest(model, reference, prompts):
    engine = BatchingEngine(model)
    batch = prompts(6, seed=7)
    done = {i: threading.Event() for i in range(len(batch))}
    recorders = {}

    def on_event(i):
        def record(event):
            recorders[i].append(event)
            if event.finish_reason is not None:
                done[i].set()
        return record

    engine.start()
    try:
        threads = []
        for i, prompt in enumerate(batch):
            recorders[i] = []
            threads.append(threading.Thread(target=engine.submit, args=(Request(prompt, 8, on_event(i)),)))
            threads[-1].start()
        for t in threads:
            t.join()
        assert all(done[i].wait(60) for i in done)
        for i, prompt in enumerate(batch):
            assert [e.token_id for e in recorders[i] if e.token_id is not None] == _expected(reference, prompt, 8)
        assert engine.idle()
    finally:
        engine.stop(timeout=60)
    leftover = Recorder()
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(Request(batch[0], 4, leftover))


def test_stop_cancels_the_requests_still_running_or_waiting(model, prompts):
    engine = BatchingEngine(model)
    recorders = [Recorder() for _ in range(6)]
    for prompt, rec in zip(prompts(6, seed=8), recorders):
        engine.submit(Request(prompt, 20, rec, ignore_eos=True))
    engine.step()  # four of them run, two wait
    assert engine.stats()["running"] == MAX_BATCH
    engine.stop()
    assert [r.finish for r in recorders] == ["cancelled"] * 6
    assert engine.stats()["finished"]["cancelled"] == 6


def _moe_steps(model) -> int:
    """Layer steps the first MoE layer has run (one per forward through it)."""
    return next(iter(model.moerun.stats()["per_layer"].values()))["steps"]


@pytest.fixture(scope="module")
def chunked(model, checkpoints, load_model):
    """The module's model (same decode path) loaded with activations reserved for forwards of 8 tokens."""
    return load_model(checkpoints["chat"], fast_decode=model.moerun.fast_decode, prefill_chunk=8)


def test_a_prompt_beyond_the_plans_prefill_chunk_is_prefilled_in_chunks_with_the_same_tokens(chunked, model, reference,
                                                                                             prompts):
    long = torch.randint(6, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    engine = BatchingEngine(chunked)
    assert engine.stats()["prefill_chunk"] == chunked.moerun.plan.prefill_chunk == 8
    steps = _moe_steps(chunked)
    engine.submit(Request(long, 1, Recorder()))  # the prefill and its first token: no decode step
    _until_idle(engine)
    assert _moe_steps(chunked) - steps == 5  # 40 tokens in forwards of 8, as generate() runs them
    steps = _moe_steps(chunked)
    chunked.generate(torch.tensor([long]), max_new_tokens=1, do_sample=False)
    assert _moe_steps(chunked) - steps == 5
    # In a later row, while another request decodes: each chunk writes its own positions of its row.
    short, recorders = prompts(1, seed=3)[0], [Recorder(), Recorder()]
    engine.submit(Request(short, 12, recorders[0]))
    engine.step()
    engine.submit(Request(long, 12, recorders[1]))
    _until_idle(engine)
    assert recorders[0].tokens == _expected(reference, short, 12)
    assert recorders[1].tokens == _expected(reference, long, 12)
    # The module's model reserves a whole prompt's activations: one forward, the same tokens.
    whole, recorder = BatchingEngine(model), Recorder()
    assert whole.prefill_chunk >= len(long)
    steps = _moe_steps(model)
    whole.submit(Request(long, 12, recorder))
    whole.step()
    assert _moe_steps(model) - steps == 2  # the prefill's forward and the first decode step
    _until_idle(whole)
    assert recorder.tokens == recorders[1].tokens


@pytest.mark.gpu
@pytest.mark.parametrize("experts, prefill_chunk", [("evicting", None), ("resident", None), ("evicting", 8)])
def test_on_the_gpu_graphed_steps_serve_every_row_at_its_own_position(experts, prefill_chunk, checkpoints, prompts):
    # The fast path's CUDA graphs replay the row cache's writes with the positions of each step, as
    # planned steps (an expert can miss: 4 slots) and as whole-step graphs (every expert resident);
    # with prefill_chunk=8, prompts of 9..20 tokens are prefilled in chunks (by the engine and by generate()).
    import moerun

    path = checkpoints["chat"]
    kw = dict(device="cuda", max_context=MAX_CONTEXT, max_batch=MAX_BATCH, progress=False,
              policy="policy p { cache { eviction = lru } }", prefill_chunk=prefill_chunk)
    plan = moerun.memory_plan(path, vram_budget=1 << 34,
                              **{k: kw[k] for k in ("device", "max_context", "max_batch", "prefill_chunk")})
    budget = plan.fixed_bytes + 4 * plan.slot_bytes if experts == "evicting" else "auto"
    model = moerun.load(path, vram_budget=budget, **kw)
    batch = prompts(10, seed=9)
    want = []
    for prompt in batch:
        out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, do_sample=False)
        tokens = out[0, len(prompt):].tolist()
        want.append(tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens)
    engine = BatchingEngine(model)
    recorders = [Recorder() for _ in batch]
    for i, (prompt, rec) in enumerate(zip(batch, recorders)):
        engine.submit(Request(prompt, 12, rec))
        if i % 3 == 2:
            engine.step()  # arrivals between steps
    _until_idle(engine)
    assert [r.tokens for r in recorders] == want
    decode = model.moerun.stats()["decode"]
    assert decode["graph_replays"] > 0
    assert (decode["whole_steps"] > 0) == (experts == "resident")
