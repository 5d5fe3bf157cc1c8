"""``moerun policy check|explain|fmt``: the policy language on the command line."""
from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from ..cli import whole_number
from ..files import write_text
from . import POLICY_SUFFIX, bundled_policies, compile_policy, format_policy, load_source, parse, validate
from .compiler import compile_policy_ir
from .errors import PolicyError
from .explain import explain, inert_settings
from .validator import INT32_MAX

ERRORS = (PolicyError,)  # what these commands raise for bad input (moerun.cli prints it)


def add_parser(subparsers) -> None:
    """Register ``policy`` and its sub-commands on the ``moerun`` parser."""
    group = subparsers.add_parser("policy", help="check, explain and format .moe policies")
    sub = group.add_subparsers(dest="command", metavar="{check,explain,fmt}")
    sub.required = True

    check = sub.add_parser("check", help="report every error in policy files (exit 1 if any)")
    check.add_argument("files", nargs="+", metavar="FILE", help=".moe file or bundled policy name")
    _shape_args(check)
    check.set_defaults(func=run_check)

    explain_p = sub.add_parser("explain", help="say in plain words what a policy does")
    explain_p.add_argument("file", metavar="FILE", help=".moe file or bundled policy name")
    explain_p.add_argument("--name", help="policy to explain in a multi-policy file (default: all)")
    _shape_args(explain_p)
    explain_p.set_defaults(func=run_explain)

    fmt = sub.add_parser("fmt", help="print a policy file in canonical form")
    fmt.add_argument("file", metavar="FILE", help=".moe file")
    fmt.add_argument("--write", action="store_true", help="rewrite the file in place")
    fmt.set_defaults(func=run_fmt)


def _shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=whole_number(1, INT32_MAX),
                        help="MoE layers of the target model (enables shape checks)")
    parser.add_argument("--experts", type=whole_number(1, INT32_MAX),
                        help="routed experts per layer of the target model")


def _fail(err: PolicyError) -> int:
    print(err.format(), file=sys.stderr)
    return 1


def run_check(args: argparse.Namespace) -> int:
    failed = 0
    for spec in args.files:
        try:
            text, filename = load_source(spec)
            policy_file = validate(parse(text, filename), num_layers=args.layers, num_experts=args.experts)
        except PolicyError as err:
            failed += 1
            _fail(err)
            continue
        names = ", ".join(p.name for p in policy_file.policies)
        print(f"{filename}: ok ({names})")
        for policy in policy_file.policies:
            for note in inert_settings(policy):
                print(f"{filename}:{note}")
    return 1 if failed else 0


def run_explain(args: argparse.Namespace) -> int:
    try:
        text, filename = load_source(args.file)
        policy_file = validate(parse(text, filename), num_layers=args.layers, num_experts=args.experts)
        if args.name is not None:
            print(explain(compile_policy(policy_file, name=args.name)))
            return 0
    except PolicyError as err:
        return _fail(err)
    print("\n\n".join(explain(compile_policy_ir(p, filename)) for p in policy_file.policies))
    return 0


def run_fmt(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if args.write and not path.exists():
        return _fail(PolicyError(_not_a_file(args.file)))
    try:
        text, filename = load_source(path if path.exists() else args.file)
        formatted = format_policy(parse(text, filename))
    except PolicyError as err:
        return _fail(err)
    if not args.write:
        sys.stdout.write(formatted)
    elif formatted != text:
        refusal = _not_replaceable(path)
        if refusal:
            return _fail(PolicyError(refusal))
        write_text(path, formatted, what="policy file")  # atomic: a failed write leaves the file as it was
        print(f"{path}: formatted")
    return 0


def _not_a_file(spec: str) -> str:
    """Why ``fmt --write spec`` has no file to rewrite (``spec`` names no existing path)."""
    if "{" in spec:
        return "--write rewrites a .moe file, and this is policy text; without --write fmt prints its canonical form"
    if spec in bundled_policies() or spec.removesuffix(POLICY_SUFFIX) in bundled_policies():
        name = spec.removesuffix(POLICY_SUFFIX)
        return (f"--write rewrites a .moe file, not a bundled name: {spec} is a bundled policy "
                f"(`moerun policy fmt {name} > {name}{POLICY_SUFFIX}` writes a copy you can edit)")
    return f"{spec} does not exist: --write rewrites an existing .moe file (check the path)"


def _not_replaceable(path: Path) -> str | None:
    """Why ``fmt --write`` must not replace ``path`` (it writes a new file and renames it over the old
    one), or None. The rename would ignore a read-only mode, and would leave a hard link's other names
    holding the old text."""
    st = path.stat()
    if not st.st_mode & 0o222 or not os.access(path, os.W_OK):
        return (f"{path} is read-only (mode {stat.S_IMODE(st.st_mode):o}): --write does not replace a file that is "
                f"not writable; make it writable (chmod u+w {path}) or run fmt without --write to print the result")
    if st.st_nlink > 1:
        return (f"{path} has {st.st_nlink} hard links: --write writes a new file in its place, so the other names "
                f"would keep the old text; run fmt without --write and copy the output in, or break the link first")
    return None
