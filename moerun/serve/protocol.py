"""The OpenAI API's request bodies and error body, as the server accepts them.

Pydantic models of ``/v1/completions`` and ``/v1/chat/completions`` requests: the fields moerun
honours, with OpenAI's ranges and defaults, a few widely used extensions from vLLM (``top_k``,
``stop_token_ids``, ``ignore_eos``), and fields moerun does not implement accepted only at their
neutral value (a non-zero ``presence_penalty`` is an error, not silently ignored). Fields the API
does not have are ignored, as OpenAI-compatible servers do (clients send vendor extras).

:class:`ApiError` is an error the server answers with the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` and its HTTP status.

This module knows nothing about models, tokenizers or the engine.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16


class ApiError(Exception):
    """An error answered with the OpenAI error body and ``status`` (module docstring)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002 - the API's name
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # HTTP headers of the reply (Retry-After)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class GenerationRequest(_Request):
    """The fields both generation endpoints share."""

    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # vLLM's extension; -1 and 0 keep every token
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _neutral_unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by moerun (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by moerun")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if isinstance(self.stop, str) and not self.stop:
            raise ValueError("stop must not be an empty string")
        return self

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def sampling(self, logprobs: int | None, choice: int) -> SamplingParams:
        """The engine's settings of choice ``choice`` (several choices of one seeded request differ)."""
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
                              seed=seed, logprobs=logprobs)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is text, token ids, or a list of either (a choice each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.suffix:
            raise ValueError("suffix is not supported by moerun")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise ValueError("best_of is not supported by moerun (only equal to n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (the prompt's log-probabilities) is not supported by moerun")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool calls and other keys reach the chat template

    role: str
    content: str | list[TextPart] | None = None

    def template_dict(self) -> dict:
        """The message as a chat template reads it (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {**(self.model_extra or {}), "role": self.role, "content": content}


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: the rest of the context
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format other than {'type': 'text'} is not supported by moerun")
        if self.tools and self.tool_choice != "none":
            raise ValueError("tools (function calling) are not supported by moerun")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
