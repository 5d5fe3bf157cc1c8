"""The parsed form of a ``.moe`` file: frozen dataclasses named after the grammar rules.

Every node carries its source position (:class:`Span`) for error messages, and the ``#`` comments
written before it (``comments``) or after it on the same line (``trailing``) so that the formatter
can give them back. Positions do not take part in equality (``compare=False``): two syntax trees are equal
when they say the same thing with the same comments, wherever the text put it, which is what
``parse(format(tree)) == tree`` needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Span:
    """A source range: 1-based line and column of the first character, and of one past the last."""

    line: int = 0
    col: int = 0
    end_line: int = 0
    end_col: int = 0


NOWHERE = Span()


def _span() -> Span:
    return field(default=NOWHERE, compare=False, repr=False)


# -- values ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    """A numeric literal; ``value`` is an int when the text had no ``.`` or exponent."""

    value: Union[int, float]
    span: Span = _span()


@dataclass(frozen=True)
class Word:
    """A bare name used as a value: an enum member, ``true``/``false``, ``auto``."""

    text: str
    span: Span = _span()


@dataclass(frozen=True)
class String:
    """A double-quoted text value (a file path: ``predictor = "experts.npz"``), without its quotes."""

    text: str
    span: Span = _span()


@dataclass(frozen=True)
class Pair:
    """``LAYER:EXPERT`` inside a list (``pin = [0:3, 5]``)."""

    first: Number
    second: Number
    span: Span = _span()


ListItem = Union[Number, Word, Pair]


@dataclass(frozen=True)
class List:
    """``[item, item, ...]``."""

    items: tuple[ListItem, ...]
    span: Span = _span()


Value = Union[Number, Word, String, List]


# -- statements -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """``key = value``; ``key`` may be qualified (``cache.eviction``) inside adapt rules."""

    key: str
    value: Value
    comments: tuple[str, ...] = ()
    trailing: str | None = None
    span: Span = _span()          # the key


@dataclass(frozen=True)
class Trigger:
    """``trigger NAME`` in an adapt rule."""

    target: str
    comments: tuple[str, ...] = ()
    trailing: str | None = None
    span: Span = _span()          # the target name


@dataclass(frozen=True)
class Rebalance:
    """``rebalance NAME`` in an adapt rule."""

    target: str
    comments: tuple[str, ...] = ()
    trailing: str | None = None
    span: Span = _span()


Action = Union[Setting, Trigger, Rebalance]


@dataclass(frozen=True)
class Window:
    """``for N UNIT`` after an adapt condition."""

    length: Number
    unit: str
    unit_span: Span = _span()


@dataclass(frozen=True)
class Rule:
    """``when METRIC OP THRESHOLD [for N accesses] { actions }``."""

    metric: str
    op: str
    threshold: Number
    window: Window | None
    actions: tuple[Action, ...]
    comments: tuple[str, ...] = ()
    trailing: str | None = None   # after the opening line
    closing: tuple[str, ...] = ()  # comments before the closing brace
    span: Span = _span()          # the metric name
    body_span: Span = _span()     # the whole rule


@dataclass(frozen=True)
class Block:
    """``NAME { setting ... }``: cache, prefetch, schedule, monitor, per_layer, host."""

    name: str
    settings: tuple[Setting, ...]
    comments: tuple[str, ...] = ()
    closing: tuple[str, ...] = ()
    span: Span = _span()          # the block name


@dataclass(frozen=True)
class AdaptBlock:
    """``adapt { rule ... }``."""

    rules: tuple[Rule, ...]
    comments: tuple[str, ...] = ()
    closing: tuple[str, ...] = ()
    span: Span = _span()

    name = "adapt"


Section = Union[Block, AdaptBlock]


@dataclass(frozen=True)
class Policy:
    """``policy NAME { section ... }``."""

    name: str
    sections: tuple[Section, ...]
    comments: tuple[str, ...] = ()
    closing: tuple[str, ...] = ()
    span: Span = _span()          # the policy name

    def section(self, name: str) -> Section | None:
        """The first section called ``name``, or None."""
        return next((s for s in self.sections if s.name == name), None)


@dataclass(frozen=True)
class Version:
    """``version N`` header."""

    number: Number
    comments: tuple[str, ...] = ()
    span: Span = _span()


@dataclass(frozen=True)
class PolicyFile:
    """A whole ``.moe`` file: optional version header, then policies."""

    version: Version | None
    policies: tuple[Policy, ...]
    closing: tuple[str, ...] = ()  # comments after the last policy
    filename: str = field(default="<string>", compare=False)
    source: str = field(default="", compare=False, repr=False)
