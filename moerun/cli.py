"""The ``moerun`` console script (also ``python -m moerun``).

Each command group lives with the concept it serves: ``moerun policy ...`` in
``moerun.policy.commands``, ``moerun trace ...`` in ``moerun.trace.commands``, ``moerun run`` (one
command, no sub-commands) in ``moerun.run_command``, ``moerun serve`` in ``moerun.serve.command``. A group module
exposes ``add_parser(subparsers)``, which registers its sub-commands, each with a ``func(args) -> int``,
and ``ERRORS``, the error types its commands raise for bad input. Those, and OSError (a file that
cannot be read or written), end the command here: the message on stderr, exit status 1, no
traceback. A policy error keeps its compiler-style lines (file:line:col, source, caret, hint);
every other error is one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (command, module providing add_parser); imported lazily so `moerun policy` never imports torch.
GROUPS = (
    ("policy", "moerun.policy.commands"),
    ("trace", "moerun.trace.commands"),
    ("run", "moerun.run_command"),
    ("serve", "moerun.serve.command"),
)


def build_parser(groups=GROUPS) -> tuple[argparse.ArgumentParser, tuple[type[BaseException], ...]]:
    """The parser of ``groups`` and the error types their commands raise for bad input."""
    parser = argparse.ArgumentParser(prog="moerun", description="Run MoE models on a GPU too small for them.")
    sub = parser.add_subparsers(dest="group", metavar="{" + ",".join(g for g, _ in groups) + "}")
    sub.required = True
    errors: tuple[type[BaseException], ...] = (OSError,)
    for _name, module in groups:
        group = importlib.import_module(module)
        group.add_parser(sub)
        errors += tuple(group.ERRORS)
    return parser, errors


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the chosen command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # Import only the group that was asked for, so a broken optional group cannot break another.
    chosen = [g for g in GROUPS if argv and argv[0] == g[0]]
    parser, errors = build_parser(chosen or GROUPS)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except errors as exc:
        print(error_text(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moerun: interrupted", file=sys.stderr)
        return 130


def whole_number(lo: int, hi: int):
    """An argparse ``type``: a whole number of ASCII digits in ``lo..hi`` (the limit of what takes it)."""
    def parse(text: str) -> int:
        digits = text.lstrip("+-")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= len(str(hi)) + 1):
            raise argparse.ArgumentTypeError(f"expected a whole number in {lo}..{hi}, got {text!r}")
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its messages
    return parse


def add_expert_options(p: argparse.ArgumentParser) -> None:
    """``--expert-format`` and ``--dtype``: what moerun.load takes as ``expert_format`` and ``dtype``, read
    the same way by every command that loads a model (whether a format suits the checkpoint and the dtype,
    load checks before it allocates)."""
    from .checkpoint_quantization import FLOAT_ALIASES, FORMAT_ALIASES
    from .dtypes import DTYPE_NAMES as dtypes
    from .native import EXPERT_FORMATS

    formats = ("auto", *FLOAT_ALIASES, *FORMAT_ALIASES, *EXPERT_FORMATS)

    def expert_format(text: str) -> str:
        if text.strip().lower() not in formats:
            raise argparse.ArgumentTypeError(f"unknown expert format {text!r}; use one of {', '.join(formats)}")
        return text.strip().lower()

    def dtype(text: str):
        if text.strip().lower() not in dtypes:
            raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(dtypes)}")
        return dtypes[text.strip().lower()]

    expert_format.__name__, dtype.__name__ = "expert format", "dtype"  # argparse names the type in its messages
    p.add_argument("--expert-format", type=expert_format, default="auto", metavar="FORMAT",
                   help="how routed experts are kept in host memory and in the arena (moerun.load's expert_format): "
                        f"auto (the checkpoint's own; the default) or one of {', '.join(formats[1:])}; a float "
                        "checkpoint is quantized at load, a packed one decodes into float where that is exact")
    p.add_argument("--dtype", type=dtype, default=None, metavar="DTYPE",
                   help=f"compute dtype: {', '.join(dtypes)} (default: the checkpoint's)")


def error_text(exc: BaseException) -> str:
    """What the command line prints for ``exc``: a policy error's diagnostics, else ``error: ...`` on one line."""
    from .policy.errors import PolicyError  # here: reached only when a command failed

    if isinstance(exc, PolicyError):
        return exc.format()
    return "error: " + " ".join(str(exc).split())
