"""The HTTP API on a real uvicorn server on localhost (the official ``openai`` client among its clients):
replies are the greedy generate()'s, 32 clients share 4 rows, bad requests get OpenAI error bodies,
a client that goes away frees its row. Load is bounded: at most 32 requests of a few tokens at a time,
every client with a timeout."""
import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from moerun.serve.app import create_app
from moerun.serve.batching import BatchingEngine

MODEL = "tiny-moe"
EOS = 2
TIMEOUT_S = 60


class _Server:
    """A uvicorn server on a free localhost port, on a thread; ``url`` of its API."""

    def __init__(self, app, **config):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(TIMEOUT_S)


@pytest.fixture(scope="module")
def served(checkpoints, load_model, tokenizer_of):
    """(server, engine, tokenizer) of the chat checkpoint."""
    model = load_model(checkpoints["chat"])
    tokenizer = tokenizer_of()
    engine = BatchingEngine(model)
    server = _Server(create_app(engine, tokenizer, model_name=MODEL, runtime_stats=model.moerun.stats))
    yield server, engine, tokenizer
    server.stop()


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0].url, timeout=TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


def _chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def _reply(tokenizer, reference, prompt: list[int], max_tokens: int) -> tuple[str, str]:
    """generate()'s reply text and finish reason (the EOS token ends it; special tokens have no text)."""
    tokens = reference(prompt, max_tokens)
    if EOS in tokens:
        return tokenizer.decode(tokens[:tokens.index(EOS)], skip_special_tokens=True), "stop"
    return tokenizer.decode(tokens, skip_special_tokens=True), "length"


def test_the_openai_client_chats_and_streams_the_greedy_reply(served, oai, reference):
    _, _, tokenizer = served
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    text, reason = _reply(tokenizer, reference, _chat_ids(tokenizer, "w1 w2 w3"), 10)
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == reason
    assert whole.usage.prompt_tokens == len(_chat_ids(tokenizer, "w1 w2 w3"))
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_completions_of_token_ids_with_choices_and_logprobs(served, client, reference, prompts):
    _, _, tokenizer = served
    prompt_a, prompt_b = prompts(2, seed=11)
    body = {"model": MODEL, "prompt": [prompt_a, prompt_b], "max_tokens": 6, "temperature": 0, "n": 2,
            "logprobs": 2}
    out = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for choice, prompt in zip(out["choices"], [prompt_a, prompt_a, prompt_b, prompt_b]):
        text, reason = _reply(tokenizer, reference, prompt, 6)
        assert (choice["text"], choice["finish_reason"]) == (text, reason)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-6  # greedy: the chosen is the top
                   for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert out["usage"]["prompt_tokens"] == len(prompt_a) + len(prompt_b)
    echo = client.post("/v1/completions", json={"model": MODEL, "prompt": "w7 w8", "max_tokens": 3, "temperature": 0,
                                                "echo": True}).json()
    assert echo["choices"][0]["text"].startswith("w7 w8")


def test_32_concurrent_streaming_clients_against_4_rows_all_complete(served, reference, prompts):
    server, engine, tokenizer = served
    batch = prompts(32, seed=12)
    before = engine.stats()

    async def one(client, prompt):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
        text, finish = "", None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        return text, finish

    async def all_clients():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in batch)), TIMEOUT_S)

    results = asyncio.run(all_clients())
    for prompt, got in zip(batch, results):
        assert got == _reply(tokenizer, reference, prompt, 8)
    after = engine.stats()
    assert after["prefills"] - before["prefills"] == 32
    assert after["running"] == after["waiting"] == 0
    # 32 requests through 4 rows: at least 8 rounds of a few decode steps each.
    assert after["decode_steps"] - before["decode_steps"] >= 8 * 3


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "w1"}, 404, "model", "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": " ".join(["w1"] * 97)}, 400, "messages/prompt",
     "maximum context length is 96 tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "max_tokens": 200}, 400, "max_tokens", "at most 95"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "temperature": -0.5}, 400, "temperature", "greater than"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "top_p": 0}, 400, "top_p", "greater than"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "logprobs": 21}, 400, "logprobs", "less than"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 128]}, 400, "prompt", "outside this model's vocabulary"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "Field required"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt",
     "prompt: must be a string, an array of strings, an array of token ids or an array of arrays of token ids, got "
     "a number"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, "w1"]}, 400, "prompt", "item 1 is not"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", "prompt: must not be an empty array"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "stop": ["w"] * 17}, 400, "stop",
     "stop: at most 16 stop sequences, got 17"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "stop": ["w", 3]}, 400, "stop", "item 1 is a number"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "frequency_penalty": 0.5}, 400, "frequency_penalty",
     "frequency_penalty: not supported by moerun (only 0)"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "presence_penalty": 1}, 400, "presence_penalty",
     "presence_penalty: not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "w1", "best_of": 3}, 400, "best_of", "best_of: only 1 or equal"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages[0].content",
     "messages[0].content: only text content is supported, got a part of type 'image_url'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "w1"}, {"content": "w2"}]},
     400, "messages[1].role", "messages[1].role: Field required"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "w1"}], "stop": ""}, 400,
     "stop", "stop: must be a non-empty string"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2},
     400, "top_logprobs", "top_logprobs: needs logprobs=true"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "w1"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "tools: function calling is not supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "w1"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format",
     "response_format: only {'type': 'text'} is supported by moerun, got type 'json_object'"),
])
def test_bad_requests_get_openai_error_bodies(client, path, body, status, param, words):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert client.get("/health").json() == {"status": "ok"}  # the server goes on


def test_malformed_json_and_unknown_routes_get_error_bodies(client):
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_a_checkpoint_without_a_chat_template_cannot_chat(served, tokenizer_of):
    _, engine, _ = served
    app = create_app(engine, tokenizer_of(None), model_name=MODEL, manage_engine=False)

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user",
                                                                                             "content": "w1"}]})
    response = asyncio.run(ask())
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_chat_template"


@pytest.fixture
def slow_steps(served, monkeypatch):
    """Each decode step of the served engine takes at least 20 ms, so a client can leave mid-reply."""
    engine = served[1]
    decode = engine._decode

    def slow():
        time.sleep(0.02)
        decode()
    monkeypatch.setattr(engine, "_decode", slow)


def _wait_idle(engine, cancelled_before: int):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["running"] == 0 and stats["finished"]["cancelled"] > cancelled_before:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"the row was not freed: {engine.stats()}")


def test_a_disconnected_stream_frees_its_row(served, slow_steps):
    server, engine, _ = served
    before = engine.stats()
    body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 90, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c, c.stream("POST", "/v1/completions",
                                                                             json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the first token came: the request has a row
        assert engine.stats()["running"] == 1
    stats = _wait_idle(engine, before["finished"]["cancelled"])
    assert stats["generated_tokens"] - before["generated_tokens"] < 90  # it stopped early


def test_a_client_that_gives_up_on_a_whole_reply_frees_its_row(served, slow_steps):
    server, engine, _ = served
    before = engine.stats()
    body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 90, "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body)
    stats = _wait_idle(engine, before["finished"]["cancelled"])
    assert stats["generated_tokens"] - before["generated_tokens"] < 90


def test_metrics_report_the_engine_and_the_runtime(client):
    body = client.get("/metrics").json()
    assert body["engine"]["max_batch"] == 4 and body["engine"]["running"] == 0
    assert body["runtime"]["hits"] + body["runtime"]["misses"] > 0  # the runtime's stats(), as JSON
    assert "decode" in body["runtime"] and "engine" in body["runtime"]


def test_a_chat_stream_stops_at_a_stop_string_with_logprobs(served, oai, reference):
    _, _, tokenizer = served
    prompt = _chat_ids(tokenizer, "w4 w5")
    text, _ = _reply(tokenizer, reference, prompt, 12)
    words = text.split()
    assert len(words) >= 4, "the reference reply is too short for this test"
    stop = " " + words[2]
    shown = text[:text.index(stop)]
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w4 w5"}],
                                              max_tokens=12, temperature=0, stream=True, stop=[stop],
                                              logprobs=True, top_logprobs=2))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == shown
    assert chunks[-1].choices[0].finish_reason == "stop"
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) >= len(shown.split())  # one per token, the tokens of the stop string included
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)


def test_a_full_queue_gets_503_with_retry_after_and_the_queued_request_completes(served, slow_steps, monkeypatch,
                                                                                   reference):
    server, engine, tokenizer = served
    monkeypatch.setattr(engine, "max_queue", 1)
    before = engine.stats()
    hold = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True}
    queued_prompt = [9, 10, 11]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as c:
            async def holder():  # holds a row for 40 slow steps
                async with c.stream("POST", "/v1/completions", json=hold) as response:
                    return [line async for line in response.aiter_lines() if line]
            holders = [asyncio.create_task(holder()) for _ in range(4)]
            while engine.stats()["submitted"] - before["submitted"] < 4:
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(c.post("/v1/completions", json={
                "model": MODEL, "prompt": queued_prompt, "max_tokens": 4, "temperature": 0}))
            while engine.stats()["submitted"] - before["submitted"] < 5:
                await asyncio.sleep(0.01)
            refused = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": [
                {"role": "user", "content": "w3"}]})
            metrics = (await c.get("/metrics")).json()["engine"]
            return refused, metrics, await queued, await asyncio.gather(*holders)

    refused, metrics, queued, held = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "server_overloaded" and "--max-queue 1" in error["message"], error
    assert metrics["rejected"] - before["rejected"] == 1 and metrics["max_queue"] == 1
    # What waits beyond the free rows is bounded by max_queue (some holders may still wait for a row: their
    # prefills join between steps, one at a time).
    assert metrics["waiting"] <= metrics["max_batch"] - metrics["running"] + metrics["max_queue"], metrics
    assert queued.status_code == 200
    assert queued.json()["choices"][0]["text"] == _reply(tokenizer, reference, queued_prompt, 4)[0]
    assert all(lines[-1] == "data: [DONE]" for lines in held)


def test_a_shutdown_cuts_what_outlasts_its_grace_period_with_an_error_and_frees_the_rows(served, slow_steps):
    _, engine, tokenizer = served
    app = create_app(engine, tokenizer, model_name=MODEL, manage_engine=False)  # the engine is the module's
    server = _Server(app, timeout_graceful_shutdown=0.2)
    before = engine.stats()
    body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 90, "ignore_eos": True, "temperature": 0}
    whole = {}

    def ask_whole():  # a request waiting for its whole reply
        with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c:
            whole["response"] = c.post("/v1/completions", json=body)

    asker = threading.Thread(target=ask_whole)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT_S) as c, c.stream("POST", "/v1/completions",
                                                                             json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        received = [next(lines)]  # the request holds a row
        asker.start()
        deadline = time.monotonic() + TIMEOUT_S
        while engine.stats()["running"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.server.should_exit = True  # what SIGINT/SIGTERM set
        received.extend(line for line in lines if line)  # the stream ends, not cut off
    asker.join(TIMEOUT_S)
    server.thread.join(TIMEOUT_S)
    assert not server.thread.is_alive()
    _wait_idle(engine, before["finished"]["cancelled"] + 1)
    assert received[-1] == "data: [DONE]"
    error = json.loads(received[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutdown" and "shutting down" in error["message"], received[-3:]
    assert all("error" not in line for line in received[:-2])
    assert whole["response"].status_code == 503
    assert whole["response"].json()["error"]["code"] == "server_shutdown"
