"""The OpenAI API's request bodies and error body, as the server accepts them.

Pydantic models of ``/v1/completions`` and ``/v1/chat/completions`` requests: the fields moerun
honours, with OpenAI's ranges and defaults, a few widely used extensions from vLLM (``top_k``,
``stop_token_ids``, ``ignore_eos``), and fields moerun does not implement accepted only at their
neutral value (a non-zero ``presence_penalty`` is an error, not silently ignored). Fields the API
does not have are ignored, as OpenAI-compatible servers do (clients send vendor extras).

:class:`ApiError` is an error the server answers with the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` and its HTTP status.

Validation errors name the field at fault (app.py turns them into error bodies): a field that takes
several JSON types (``prompt``, ``stop``, a message's ``content``, ``tool_choice``) is checked by a
validator of its own, so the message says what the field may be rather than why one of its types did
not match; a check that reads several fields raises :func:`field_error`, which carries the field.

This module knows nothing about models, tokenizers or the engine.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

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


def field_error(param: str, message: str) -> PydanticCustomError:
    """A validation error about the field ``param`` from a check over the whole body (whose location names
    no field): the field travels in the error's context, where app.py reads it."""
    return PydanticCustomError("invalid_field", "{message}", {"param": param, "message": message})


def _json_type(value) -> str:
    """What a client sent, in JSON's words (for a field given the wrong type)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    return "an array" if isinstance(value, list) else "an object"


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_sequences(cls, value):
        if value is None or (isinstance(value, str) and value):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be a non-empty string or an array of at most {MAX_STOP_STRINGS} of them, got "
                             f"{_json_type(value)}")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(value)}")
        for index, item in enumerate(value):
            if not (isinstance(item, str) and item):
                raise ValueError(f"each stop sequence must be a non-empty string; item {index} is {_json_type(item)}")
        return value

    @model_validator(mode="after")
    def _neutral_unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise field_error(name, f"not supported by moerun (only 0), got {getattr(self, name)}")
        if self.logit_bias:
            raise field_error("logit_bias", "not supported by moerun")
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options", "only allowed with stream=true")
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

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_kind(cls, value):
        kinds = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be {kinds}, got {_json_type(value)}")
        if not value:
            raise ValueError("must not be an empty array")
        first = value[0]
        if isinstance(first, str):
            kind, fits = "a string", lambda item: isinstance(item, str)
        elif _is_token(first):
            kind, fits = "a token id (an integer)", _is_token
        elif isinstance(first, list):
            kind = "an array of token ids (integers)"
            fits = lambda item: isinstance(item, list) and all(map(_is_token, item))  # noqa: E731
        else:
            raise ValueError(f"must be {kinds}; item 0 is {_json_type(first)}")
        for index, item in enumerate(value):
            if not fits(item):
                raise ValueError(f"must be {kinds}; as item 0 is {_json_type(first)}, every item must be {kind}, and "
                                 f"item {index} is not")
        return value

    @model_validator(mode="after")
    def _supported(self):
        if self.suffix:
            raise field_error("suffix", "not supported by moerun")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise field_error("best_of", f"only 1 or equal to n is supported by moerun, got {self.best_of} with "
                                         f"n={self.n}")
        if self.echo and self.logprobs is not None:
            raise field_error("echo", "echo with logprobs (the prompt's log-probabilities) is not supported by moerun")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool calls and other keys reach the chat template

    role: str
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value):
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"must be a string or an array of text parts, got {_json_type(value)}")
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                got = f"a part of type {kind!r}" if isinstance(kind, str) else f"{_json_type(part)} as part {index}"
                raise ValueError(f"only text content is supported, got {got}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"text part {index} must have a string \"text\", got {_json_type(part.get('text'))}")
        return value

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

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_kind(cls, value):
        if value is not None and not isinstance(value, (str, dict)):
            raise ValueError(f"must be a string or an object, got {_json_type(value)}")
        return value

    @model_validator(mode="after")
    def _supported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs", "needs logprobs=true")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise field_error("response_format", "only {'type': 'text'} is supported by moerun, got type "
                                                 f"{self.response_format.get('type')!r}")
        if self.tools and self.tool_choice != "none":
            raise field_error("tools", "function calling is not supported by moerun (tools are accepted only with "
                                       "tool_choice 'none')")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
