"""The OpenAI-compatible HTTP API over a :class:`~moerun.serve.batching.BatchingEngine`.

Built on FastAPI (Starlette + pydantic) served by uvicorn: the stack most Python model servers use
(vLLM, SGLang, TGI's Python clients' test servers, llama-cpp-python's server), so its behaviour
under streaming, disconnects and shutdown is well trodden, request validation comes from the
pydantic models in protocol.py, and there is no HTTP handling of our own.

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (JSON, or server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (the engine's
counters and the runtime's ``model.moerun.stats()`` as JSON).

Each choice of a request is one engine request. The engine runs on its own thread and calls back
with events; the callbacks hand them to the request's asyncio queue on the server's event loop.
A client that disconnects (streaming or not) cancels its engine requests, which frees their rows
at the engine's next iteration. Errors are OpenAI error bodies (protocol.ApiError) with their status:
400 for a request that cannot be served (validation, a prompt beyond the context), 404 for another
model name or route, 500 when the engine fails, 503 with ``Retry-After`` when the engine's waiting
queue is full (checked before the prompt is tokenized), 503 for requests cancelled by a shutdown. A
request the server cuts (the shutdown's grace period ran out, the engine failed it) never just stops:
a stream ends with an error event (``data: {"error": {...}}``) and ``data: [DONE]``, a whole reply is
a 503 error body (:class:`_CutRequests`).

Text: prompts are encoded and chat messages rendered with the checkpoint's tokenizer and chat
template; generated text is decoded incrementally (text_stream.py). The app knows nothing about
the model beyond the engine and a callable giving the runtime's statistics.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from typing import AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .batching import BatchingEngine, ConsumerGone, Event, QueueFull, Request, RequestError
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, GenerationRequest
from .sampling import TokenLogprob
from .text_stream import TextStream

RETRY_AFTER_S = 1  # the Retry-After of a request refused because the waiting queue is full


def create_app(engine: BatchingEngine, tokenizer, *, model_name: str,
               runtime_stats: Callable[[], dict] | None = None, manage_engine: bool = True) -> FastAPI:
    """The API over ``engine`` for the model called ``model_name`` (the name requests must give).

    ``runtime_stats``: what ``/metrics`` reports beside the engine's counters (``model.moerun.stats``).
    ``manage_engine``: start the engine's thread with the app and stop it (cancelling what is still
    in flight) when the app shuts down.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="moerun", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CutRequests)
    api = _Api(engine, tokenizer, model_name)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'cannot parse it')})"
            return JSONResponse(ApiError(400, message).body(), status_code=400)
        # A check over several fields names its field in the error's context (protocol.field_error).
        param = (first.get("ctx") or {}).get("param") or _field_path(first.get("loc", ()))
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if param:
            message = f"{param}: {message}"
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "moerun", "max_model_len": engine.max_context}]}

    @app.get("/metrics")
    def metrics() -> JSONResponse:  # a plain def: FastAPI runs it on a worker thread (stats waits for a step)
        body = {"engine": engine.stats(), "runtime": runtime_stats() if runtime_stats else None}
        return JSONResponse(_finite(body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await api.complete(body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        return await api.chat(body, http)

    return app


class _Choice:
    """One choice of a request: its engine request's id, prompt, text and log-probabilities so far."""

    def __init__(self, index: int, prompt: list[int]):
        self.index, self.prompt = index, prompt
        self.id: int | None = None
        self.text, self.tokens = "", 0
        self.logprobs: list[tuple[int, TokenLogprob]] = []
        self.finish_reason: str | None = None


class _Api:
    """The two generation endpoints (module docstring)."""

    def __init__(self, engine: BatchingEngine, tokenizer, model_name: str):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.created = int(time.time())

    # -- requests -> engine requests ---------------------------------------------------------------
    def _check_model(self, body: GenerationRequest) -> None:
        if body.model != self.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r} "
                                "(GET /v1/models)", type="not_found_error", param="model", code="model_not_found")

    def _encode(self, prompt) -> list[list[int]]:
        """Token ids of each prompt of a completion request."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        return [self.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompt]

    def _render_chat(self, body: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this checkpoint's tokenizer has no chat template, so it cannot chat; use "
                                "/v1/completions with a prompt", param="messages", code="no_chat_template")
        messages = [m.template_dict() for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template rejects messages with its own exception types
            raise ApiError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _submit(self, body: GenerationRequest, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
                queue: asyncio.Queue) -> list[_Choice]:
        """One engine request per choice (``n`` per prompt); their events go to ``queue``."""
        loop = asyncio.get_running_loop()
        choices = [_Choice(i * body.n + j, p) for i, p in enumerate(prompts) for j in range(body.n)]
        with _as_api_error():  # every choice is checked before any is submitted
            limits = [self.engine.check(len(c.prompt), max_tokens) for c in choices]
        submitted: list[int] = []
        try:
            for choice, limit in zip(choices, limits):
                def on_event(event: Event, index=choice.index) -> None:
                    if loop.is_closed():
                        raise ConsumerGone
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                text = TextStream(self.tokenizer, body.stop_strings())
                request = Request(choice.prompt, limit, on_event, sampling=body.sampling(logprobs, choice.index),
                                  stop_token_ids=frozenset(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
                                  text=text)
                with _as_api_error():
                    choice.id = self.engine.submit(request)
                submitted.append(choice.id)
        except BaseException:
            for rid in submitted:
                self.engine.cancel(rid)
            raise
        return choices

    # -- endpoints ---------------------------------------------------------------------------------
    async def complete(self, body: CompletionRequest, http: HttpRequest):
        self._check_model(body)
        prompt = body.prompt
        count = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        with _as_api_error():  # before any tokenization: a full queue costs nothing
            self.engine.check_queue(count * body.n)
        prompts = self._encode(body.prompt)
        return await self._respond(body, http, prompts, body.max_tokens, body.logprobs, chat=False)

    async def chat(self, body: ChatCompletionRequest, http: HttpRequest):
        self._check_model(body)
        with _as_api_error():
            self.engine.check_queue(body.n)
        prompt = self._render_chat(body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self._respond(body, http, [prompt], body.token_limit(), logprobs, chat=True)

    async def _respond(self, body, http: HttpRequest, prompts, max_tokens, logprobs, *, chat: bool):
        queue: asyncio.Queue = asyncio.Queue()
        choices = self._submit(body, prompts, max_tokens, logprobs, queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            return _EventStream(self._stream(body, choices, queue, rid, chat),
                                on_close=lambda: self._cancel(choices))
        try:
            finished = await _until_disconnect(http, self._collect(choices, queue))
        finally:
            self._cancel(choices)  # a no-op for finished ones
        if not finished:
            return JSONResponse({}, status_code=499)  # nobody is listening
        return JSONResponse(self._whole(body, choices, prompts, rid, chat))

    def _cancel(self, choices: list[_Choice]) -> None:
        for choice in choices:
            if choice.finish_reason is None and choice.id is not None:
                self.engine.cancel(choice.id)

    async def _collect(self, choices: list[_Choice], queue: asyncio.Queue) -> None:
        pending = len(choices)
        while pending:
            index, event = await queue.get()
            pending -= self._apply(choices[index], event)

    def _apply(self, choice: _Choice, event: Event) -> bool:
        """Fold ``event`` into ``choice``; True when it ends it. Errors and cancellations raise ApiError."""
        if event.token_id is not None:
            choice.tokens += 1
            if event.logprob is not None:
                choice.logprobs.append((event.token_id, event.logprob))
        choice.text += event.text
        if event.finish_reason is None:
            return False
        choice.finish_reason = event.finish_reason
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.error}", type="server_error")
        if event.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled (the server is shutting down)", type="server_error")
        return True

    def _usage(self, prompts: list[list[int]], choices: list[_Choice]) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _whole(self, body, choices: list[_Choice], prompts, rid: str, chat: bool) -> dict:
        out = []
        for c in choices:
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": self._chat_logprobs(c.logprobs) if body.logprobs else None,
                            "finish_reason": c.finish_reason})
            else:
                text = (self.tokenizer.decode(c.prompt) + c.text) if body.echo else c.text
                out.append({"index": c.index, "text": text,
                            "logprobs": self._completion_logprobs(c.logprobs) if body.logprobs is not None else None,
                            "finish_reason": c.finish_reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": out, "usage": self._usage(prompts, choices)}

    async def _stream(self, body, choices: list[_Choice], queue: asyncio.Queue, rid: str,
                      chat: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per event, ``data: [DONE]`` at the end."""
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices_part: list[dict], **extra) -> str:
            return _sse({"id": rid, "object": kind, "created": created, "model": self.model_name,
                         "choices": choices_part, **extra})

        if chat:  # the role comes first, as OpenAI sends it
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for c in choices])
        elif body.echo:
            yield chunk([{"index": c.index, "text": self.tokenizer.decode(c.prompt), "logprobs": None,
                          "finish_reason": None} for c in choices])
        pending = len(choices)
        try:
            while pending:
                index, event = await queue.get()
                choice = choices[index]
                seen = len(choice.logprobs)
                pending -= self._apply(choice, event)
                new_logprobs = choice.logprobs[seen:]
                if not (event.text or new_logprobs or choice.finish_reason):
                    continue
                if chat:
                    part = {"index": index, "delta": {"content": event.text} if event.text else {},
                            "logprobs": self._chat_logprobs(new_logprobs) if body.logprobs else None,
                            "finish_reason": choice.finish_reason}
                else:
                    part = {"index": index, "text": event.text,
                            "logprobs": self._completion_logprobs(new_logprobs) if body.logprobs is not None else None,
                            "finish_reason": choice.finish_reason}
                yield chunk([part])
        except ApiError as exc:
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
            return
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage=self._usage([c.prompt for c in choices[::body.n]], choices))
        yield "data: [DONE]\n\n"

    # -- log-probabilities in the API's two shapes ---------------------------------------------------
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, entries: list[tuple[int, TokenLogprob]]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = self._token_text(token_id)
            return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode())}
        return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(i, v) for i, v in lp.top]}
                            for t, lp in entries]}

    def _completion_logprobs(self, entries: list[tuple[int, TokenLogprob]]) -> dict:
        tokens = [self._token_text(t) for t, _ in entries]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [_clamp(lp.logprob) for _, lp in entries],
                "top_logprobs": [{self._token_text(i): _clamp(v) for i, v in lp.top} for _, lp in entries],
                "text_offset": offsets}


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however the stream ends (finished, failed, or the
    client gone: it listens for the disconnect itself, whatever ASGI version the server speaks)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


class _CutRequests:
    """ASGI middleware: a request whose task the server cancels (uvicorn does when the shutdown's grace
    period runs out) still gets an ending the client can tell from a finished reply: before the
    response started, a 503 error body; during a stream of server-sent events, an error event and
    ``data: [DONE]``. Then the cancellation goes on."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "stream": False, "ended": False}

        async def watched(message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                state["stream"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                      for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if not state["ended"]:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1), contextlib.suppress(Exception):
                    await self._cut(state, send)
            raise

    @staticmethod
    async def _cut(state: dict, send) -> None:
        error = ApiError(503, "the server is shutting down and cut this request before it finished",
                         type="server_error", code="server_shutdown")
        if not state["started"]:
            body = json.dumps(error.body()).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        elif state["stream"]:
            await send({"type": "http.response.body", "body": (_sse(error.body()) + "data: [DONE]\n\n").encode(),
                        "more_body": True})
            await send({"type": "http.response.body", "body": b""})


async def _until_disconnect(http: HttpRequest, work) -> bool:
    """Run ``work`` unless the client disconnects first; True when it completed."""
    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        task.result()  # raises ApiError from the engine's events
        return True
    return False


@contextlib.contextmanager
def _as_api_error():
    """The engine's RequestError (a request it cannot serve) as a 400 error body."""
    try:
        yield
    except RequestError as exc:
        raise ApiError(400, str(exc), param=exc.param,
                       code="context_length_exceeded" if "context length" in str(exc) else None) from None
    except QueueFull as exc:
        raise ApiError(503, str(exc), type="server_error", code="server_overloaded",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except RuntimeError as exc:  # the engine is shutting down
        raise ApiError(503, str(exc), type="server_error") from None


def _field_path(loc) -> str | None:
    """A validation error's location in the body as a client writes it: ``messages[0].content``."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _clamp(logprob: float) -> float:
    """JSON has no -inf: a token of probability 0 gets the lowest finite float."""
    return logprob if math.isfinite(logprob) else -3.4e38


def _finite(value):
    """``value`` with non-finite floats as None (JSON has neither NaN nor infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
