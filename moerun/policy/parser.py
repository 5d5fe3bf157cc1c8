"""Text -> syntax tree: the lark LALR parser for ``.moe`` files, with lark's errors turned into PolicyError.

The grammar lives in ``grammar.lark`` beside this module. Parsing builds :mod:`moerun.policy.syntax`
nodes with source spans; ``#`` comments are collected by the lexer and handed to the node they
precede (or follow, on the same line) so the formatter can keep them.
"""
from __future__ import annotations

import math
import sys
import threading
from importlib import resources

import lark
from lark import Lark, Token, Tree

from . import syntax
from .errors import Diagnostic, DiagnosticSink, PolicyError

# Readable names for the grammar's terminals in "expected ..." hints.
_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "OP": "a comparison (<, <=, >, >=, ==, !=)",
    "$END": "end of file",
}

# Longer whole numbers are an error here; shorter ones out of a setting's range, the validator's.
MAX_NUMBER_DIGITS = 40

_lock = threading.Lock()          # the lexer callback appends to one shared list
_comments: list[Token] = []
_parser: Lark | None = None


def _get_parser() -> Lark:
    global _parser
    if _parser is None:
        grammar = resources.files(__package__).joinpath("grammar.lark").read_text()
        _parser = Lark(grammar, parser="lalr", propagate_positions=True,
                       maybe_placeholders=True, lexer_callbacks={"COMMENT": _comments.append})
    return _parser


def parse(text: str, filename: str = "<string>") -> syntax.PolicyFile:
    """Parse policy text into a syntax tree; raises :class:`PolicyError` on a syntax error.

    Only the syntax is checked here; :func:`moerun.policy.validate` checks the meaning.
    """
    if not isinstance(text, str):
        raise PolicyError(f"policy text must be a str, got {type(text).__name__}")
    with _lock:
        parser = _get_parser()
        _comments.clear()
        try:
            tree = parser.parse(text)
        except lark.exceptions.UnexpectedInput as err:
            raise PolicyError([_syntax_diagnostic(err, parser, filename, text)]) from None
        except lark.exceptions.LarkError as err:  # anything else lark may raise, same form
            raise PolicyError([Diagnostic(f"syntax error: {err}", filename=filename)]) from None
        comments = list(_comments)
    try:
        return _Builder(comments, filename, text).file(tree)
    except _BadNumber as err:
        sink = DiagnosticSink(filename, text)
        sink.error(err.message, _token_span(err.token), err.hint)
        sink.raise_if_any()
        raise


# -- syntax errors ----------------------------------------------------------------------------------
def _describe_terminal(name: str, parser: Lark) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = parser.get_terminal(name).pattern
    except KeyError:
        return name
    return f"'{pattern.value}'" if pattern.type == "str" else name.lower()


def _syntax_diagnostic(err: lark.exceptions.UnexpectedInput, parser: Lark, filename: str,
                       text: str) -> Diagnostic:
    sink = DiagnosticSink(filename, text)
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        span = syntax.Span(err.line, err.column, err.line, err.column + 1)
        expected = sorted({_describe_terminal(t, parser) for t in err.allowed or ()})
        message = f"unexpected character {text[err.pos_in_stream]!r}"
    else:
        token = getattr(err, "token", None)
        expected = sorted({_describe_terminal(t, parser) for t in getattr(err, "expected", ()) or ()})
        if token is None or token.type == "$END":
            last = text.rstrip().splitlines() or [""]
            line = len(last)
            span = syntax.Span(line, len(last[-1]) + 1, line, len(last[-1]) + 2)
            message = "unexpected end of file (a '}' may be missing)"
        else:
            span = _token_span(token)
            message = f"unexpected {token.value!r}"
    hint = "expected " + ", ".join(expected) if expected else ""
    sink.error(message, span, hint)
    return sink.diagnostics[0]


def _token_span(tok: Token) -> syntax.Span:
    return syntax.Span(tok.line, tok.column, tok.end_line, tok.end_column)


def _tree_span(tree: Tree) -> syntax.Span:
    meta = tree.meta
    if getattr(meta, "empty", True):
        return syntax.NOWHERE
    return syntax.Span(meta.line, meta.column, meta.end_line, meta.end_column)


class _BadNumber(Exception):
    """A number token that has no value the syntax tree can hold as written."""

    def __init__(self, token: Token, message: str, hint: str):
        self.token, self.message, self.hint = token, message, hint


def _number(tok: Token) -> syntax.Number:
    text = str(tok)
    if any(c in text for c in ".eE"):
        value = float(text)
        # A float beyond the double range reads as inf (which the formatter could only write as the word
        # `inf`) and one below it as 0: either would change what the file says, so both are errors here.
        mantissa = text.lower().partition("e")[0]
        if math.isinf(value):
            raise _BadNumber(tok, f"the number {text} is too large to hold",
                             f"numbers are at most about {sys.float_info.max:.1e}")
        if value == 0 and any(c in "123456789" for c in mantissa):
            raise _BadNumber(tok, f"the number {text} is too small to hold: it would read as 0",
                             f"the smallest number above 0 is about {5e-324:.0e}; write 0 if 0 is meant")
    else:
        digits = len(text.lstrip("+-"))
        if digits > MAX_NUMBER_DIGITS:  # int() of thousands of digits raises, and nothing needs them
            raise _BadNumber(tok, f"a number of {digits} digits is larger than any setting takes",
                             f"numbers have at most {MAX_NUMBER_DIGITS} digits; the largest whole number the engine "
                             f"holds is {2**63 - 1}")
        value = int(text)
    return syntax.Number(value, _token_span(tok))


# -- lark tree -> syntax tree ----------------------------------------------------------------------------------
class _Builder:
    """Walks the lark tree in source order, attaching comments as it goes."""

    def __init__(self, comments: list[Token], filename: str, source: str):
        self._comments = comments
        self._next = 0
        self.filename = filename
        self.source = source
        self._lines = source.split("\n")  # lark counts lines by newlines only

    # comments --------------------------------------------------------------------------------------
    def _leading(self, line: int) -> tuple[str, ...]:
        """Comments that start on a line before ``line``."""
        taken = []
        while self._next < len(self._comments) and self._comments[self._next].line < line:
            taken.append(str(self._comments[self._next]).rstrip())
            self._next += 1
        return tuple(taken)

    def _trailing(self, line: int, end_col: int) -> str | None:
        """The comment on ``line`` when only closing punctuation separates it from ``end_col``."""
        if self._next >= len(self._comments) or self._comments[self._next].line != line:
            return None
        comment = self._comments[self._next]
        between = self._lines[line - 1][end_col - 1:comment.column - 1]
        if between.strip(" \t;{}]"):
            return None  # more code follows on this line: the comment belongs to that
        self._next += 1
        return str(comment).rstrip()

    def _rest(self) -> tuple[str, ...]:
        taken = tuple(str(c).rstrip() for c in self._comments[self._next:])
        self._next = len(self._comments)
        return taken

    # nodes -----------------------------------------------------------------------------------------
    def file(self, tree: Tree) -> syntax.PolicyFile:
        version = None
        policies = []
        for child in tree.children:
            if child is None:
                continue
            if child.data == "version":
                tok = child.children[0]
                version = syntax.Version(_number(tok), self._leading(tok.line), span=_token_span(tok))
            else:
                policies.append(self.policy(child))
        return syntax.PolicyFile(version, tuple(policies), self._rest(), self.filename, self.source)

    def policy(self, tree: Tree) -> syntax.Policy:
        name, *sections = tree.children
        comments = self._leading(tree.meta.line)
        built = tuple(self.section(s) for s in sections)
        return syntax.Policy(str(name), built, comments, self._leading(tree.meta.end_line),
                         _token_span(name))

    def section(self, tree: Tree) -> syntax.Section:
        comments = self._leading(tree.meta.line)
        if tree.data == "adapt_block":
            rules = tuple(self.rule(r) for r in tree.children)
            span = syntax.Span(tree.meta.line, tree.meta.column, tree.meta.line, tree.meta.column + 5)
            return syntax.AdaptBlock(rules, comments, self._leading(tree.meta.end_line), span)
        name, *settings = tree.children
        built = tuple(self.setting(s) for s in settings)
        return syntax.Block(str(name), built, comments, self._leading(tree.meta.end_line),
                        _token_span(name))

    def setting(self, tree: Tree) -> syntax.Setting:
        key, value = tree.children
        comments = self._leading(tree.meta.line)
        built = self.value(value)
        names = key.children
        span = syntax.Span(names[0].line, names[0].column, names[-1].end_line, names[-1].end_column)
        return syntax.Setting(".".join(map(str, names)), built, comments,
                          self._trailing(tree.meta.end_line, tree.meta.end_column), span)

    def value(self, tree: Tree) -> syntax.Value:
        if tree.data == "number":
            return _number(tree.children[0])
        if tree.data == "word":
            tok = tree.children[0]
            return syntax.Word(str(tok), _token_span(tok))
        if tree.data == "string":
            tok = tree.children[0]
            return syntax.String(str(tok)[1:-1], _token_span(tok))
        items = []
        for item in tree.children:
            if item is None:
                continue
            if item.data == "pair":
                first, second = item.children
                items.append(syntax.Pair(_number(first), _number(second), _tree_span(item)))
            else:
                items.append(self.value(item))
        return syntax.List(tuple(items), _tree_span(tree))

    def rule(self, tree: Tree) -> syntax.Rule:
        metric, op, threshold, window, *actions = tree.children
        comments = self._leading(tree.meta.line)
        # A comment ending the opening line: after the `{` when the body starts on a later line.
        trailing = None
        if not actions or actions[0].meta.line > tree.meta.line:
            head_end = window.meta.end_column if window is not None else threshold.end_column
            trailing = self._trailing(tree.meta.line, head_end)
        built_window = None
        if window is not None:
            length, unit = window.children
            built_window = syntax.Window(_number(length), str(unit), _token_span(unit))
        built_actions = tuple(self.action(a) for a in actions)
        return syntax.Rule(str(metric), str(op), _number(threshold), built_window, built_actions,
                       comments, trailing, self._leading(tree.meta.end_line), _token_span(metric),
                       _tree_span(tree))

    def action(self, tree: Tree) -> syntax.Action:
        if tree.data == "setting":
            return self.setting(tree)
        comments = self._leading(tree.meta.line)
        target = tree.children[0]
        node = syntax.Trigger if tree.data == "trigger" else syntax.Rebalance
        return node(str(target), comments, self._trailing(tree.meta.end_line, tree.meta.end_column),
                    _token_span(target))

