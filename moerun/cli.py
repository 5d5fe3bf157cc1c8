"""The ``moerun`` console script (also ``python -m moerun``).

Each command group lives with the concept it serves: ``moerun policy ...`` in
``moerun.policy.commands``, ``moerun trace ...`` in ``moerun.trace.commands``. A group module
exposes ``add_parser(subparsers)``, which registers its sub-commands, each with a ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (command, module providing add_parser); imported lazily so `moerun policy` never imports torch.
GROUPS = (
    ("policy", "moerun.policy.commands"),
    ("trace", "moerun.trace.commands"),
)


def build_parser(groups=GROUPS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moerun", description="Run MoE models on a GPU too small for them.")
    sub = parser.add_subparsers(dest="group", metavar="{" + ",".join(g for g, _ in groups) + "}")
    sub.required = True
    for _name, module in groups:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the chosen command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    # Import only the group that was asked for, so a broken optional group cannot break another.
    chosen = [g for g in GROUPS if argv and argv[0] == g[0]]
    args = build_parser(chosen or GROUPS).parse_args(argv)
    return int(args.func(args) or 0)
