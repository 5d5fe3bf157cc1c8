"""A sequence's generated text, decoded token by token, cut at its stop strings.

Decoding one token at a time is wrong for most tokenizers: a byte-level token may hold half a
character, and a SentencePiece word's leading space depends on what came before it. So, as
text-generation-inference and vLLM do, :class:`TextStream` decodes a short window of recent tokens
with and without the newest one and emits the difference, holding it back while it ends in an
incomplete character (U+FFFD). The emitted pieces join to ``tokenizer.decode(all tokens)``.

Stop strings: the text is cut before the first occurrence of any of them (which is not emitted), and
text that could still become the start of one is held back until it cannot (or the sequence ends).

This module knows nothing about models, rows or HTTP.
"""
from __future__ import annotations

from typing import Sequence

_INCOMPLETE = "\ufffd"


class TextStream:
    """Incremental detokenisation of one sequence with its stop strings (module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, skip_special_tokens: bool = True):
        if any(not s for s in stop):
            raise ValueError("a stop string must not be empty")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(stop)
        self._tokens: list[int] = []
        self._prefix = 0  # window start: tokens before it are decoded for good
        self._read = 0  # tokens whose text has been appended to self.text
        self.text = ""  # everything decoded so far (before any stop string cut)
        self._sent = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found; nothing more is emitted

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Append a generated token; returns the text that may be shown now ("" while held back).
        Once a stop string appears, :attr:`stopped` is True and the text before it is complete."""
        if self.stopped:
            return ""
        self._tokens.append(token_id)
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._tokens)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended (not at a stop string): whatever was held back."""
        if self.stopped:
            return ""
        if self._read < len(self._tokens):  # an incomplete character at the very end: show what it is
            whole = self._decode(self._tokens[self._prefix:])
            self.text += whole[len(self._decode(self._tokens[self._prefix:self._read])):]
            self._read = len(self._tokens)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        """Text from the last release up to what is safe to show (all of it when ``final``)."""
        text, end = self.text, len(self.text)
        if self._stop:
            longest = max(len(s) for s in self._stop)
            window = max(0, self._sent - longest + 1)  # a stop string may straddle the last release
            hits = [i for i in (text.find(s, window) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                self.text = text[:end]
            elif not final:
                end -= _held_back(text, self._stop)
        end = max(end, self._sent)
        piece, self._sent = text[self._sent:end], end
        return piece


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that begin some stop string (they may yet complete it)."""
    for length in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in stops):
            return length
    return 0
