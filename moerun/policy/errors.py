"""Policy diagnostics: one exception type, :class:`PolicyError`, carrying compiler-style messages.

A :class:`Diagnostic` names the file, line and column, shows the offending source line with a
caret under the text, and gives a hint. The validator collects every independent problem and
raises them together, so one ``moerun policy check`` run shows them all.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

from .syntax import NOWHERE, Span


@dataclass(frozen=True)
class Diagnostic:
    """One problem in a policy, with where it is and how to fix it."""

    message: str
    span: Span = NOWHERE
    hint: str = ""
    filename: str = "<string>"
    source_line: str = ""

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def col(self) -> int:
        return self.span.col

    @property
    def caret_line(self) -> str:
        """Spaces up to the column, then ``^`` under the offending text (one line at most)."""
        if not self.span.line or not self.source_line:
            return ""
        start = max(self.span.col - 1, 0)
        if self.span.end_line == self.span.line and self.span.end_col > self.span.col:
            width = self.span.end_col - self.span.col
        else:
            width = max(len(self.source_line.rstrip()) - start, 1)
        # Keep tabs so the caret lines up under the text whatever the tab width.
        indent = "".join(c if c == "\t" else " " for c in self.source_line[:start])
        return indent + "^" * width

    def format(self) -> str:
        """``file:line:col: error: message``, the source line, the caret line, the hint."""
        where = f"{self.filename}:{self.span.line}:{self.span.col}" if self.span.line else self.filename
        # A message about no place in any file (replay's "capacity = auto", say) names no "<string>".
        lines = [f"error: {self.message}" if where == "<string>" else f"{where}: error: {self.message}"]
        if self.source_line and self.span.line:
            lines += ["    " + self.source_line.rstrip("\n"), "    " + self.caret_line]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


class PolicyError(ValueError):
    """A policy that cannot be parsed, validated or found; ``diagnostics`` lists every problem.

    ``file``, ``line``, ``col``, ``caret_line`` and ``hint`` describe the first diagnostic.
    """

    def __init__(self, diagnostics: Sequence[Diagnostic] | str):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics)]
        if not diagnostics:
            raise ValueError("PolicyError needs at least one diagnostic")
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        first = self.diagnostics[0]
        self.file, self.line, self.col = first.filename, first.line, first.col
        self.caret_line, self.hint = first.caret_line, first.hint
        super().__init__(self.format())

    def format(self) -> str:
        """All diagnostics, compiler style, then a count when there are several."""
        text = "\n".join(d.format() for d in self.diagnostics)
        if len(self.diagnostics) > 1:
            text += f"\n{len(self.diagnostics)} errors"
        return text


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``did you mean 'x'?`` for the closest choice, else a list of what is allowed."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "expected one of: " + ", ".join(choices)


class DiagnosticSink:
    """Collects diagnostics for one source text, filling in the filename and source line."""

    def __init__(self, filename: str, source: str):
        self.filename = filename
        self._lines = source.split("\n")  # lark counts lines by newlines only
        self.diagnostics: list[Diagnostic] = []

    def error(self, message: str, span: Span = NOWHERE, hint: str = "") -> None:
        line = self._lines[span.line - 1] if 0 < span.line <= len(self._lines) else ""
        self.diagnostics.append(Diagnostic(message, span, hint, self.filename, line))

    def raise_if_any(self) -> None:
        if self.diagnostics:
            # Source order, so the output reads top to bottom like a compiler's.
            ordered = sorted(self.diagnostics, key=lambda d: (d.span.line, d.span.col))
            raise PolicyError(ordered)
