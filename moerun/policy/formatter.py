"""Syntax tree -> canonical ``.moe`` text: one setting per line, 4-space indents, comments kept.

``parse(format_policy(tree)) == tree`` for every syntax tree the parser can produce (a property test checks
it), so ``moerun policy fmt --write`` never changes what a policy means.
"""
from __future__ import annotations

import math

from . import syntax

INDENT = "    "


def format_policy(policy_file: syntax.PolicyFile) -> str:
    """The canonical text of a whole file (ends with a newline; a file of nothing stays empty)."""
    if policy_file.version is None and not policy_file.policies and not policy_file.closing:
        return ""
    out: list[str] = []
    if policy_file.version is not None:
        out += policy_file.version.comments
        out += [f"version {format_value(policy_file.version.number)}", ""]
    for i, policy in enumerate(policy_file.policies):
        if i:
            out.append("")
        _policy(policy, out)
    if policy_file.closing:
        if out:
            out.append("")
        out += policy_file.closing
    return "\n".join(out) + "\n"


def format_value(value: syntax.Value | syntax.Pair) -> str:
    """The canonical text of one value: ``16``, ``0.9``, ``lru``, ``"file.npz"``, ``[0:3, 7]``."""
    if isinstance(value, syntax.Number):
        if isinstance(value.value, int):
            return str(value.value)
        if not math.isfinite(value.value):  # the parser never makes one; `inf` would read back as a word
            raise ValueError(f"cannot format the number {value.value}: a .moe number is finite")
        return repr(float(value.value))
    if isinstance(value, syntax.Word):
        return value.text
    if isinstance(value, syntax.String):
        return f'"{value.text}"'
    if isinstance(value, syntax.Pair):
        return f"{format_value(value.first)}:{format_value(value.second)}"
    return "[" + ", ".join(format_value(item) for item in value.items) + "]"


def _with_trailing(text: str, trailing: str | None) -> str:
    return f"{text}  {trailing}" if trailing else text


def _comments(comments: tuple[str, ...], depth: int, out: list[str]) -> None:
    out.extend(INDENT * depth + c for c in comments)


def _policy(policy: syntax.Policy, out: list[str]) -> None:
    _comments(policy.comments, 0, out)
    out.append(f"policy {policy.name} {{")
    for section in policy.sections:
        _comments(section.comments, 1, out)
        out.append(f"{INDENT}{section.name} {{")
        if isinstance(section, syntax.AdaptBlock):
            for rule in section.rules:
                _rule(rule, out)
        else:
            for setting in section.settings:
                _action(setting, 2, out)
        _comments(section.closing, 2, out)
        out.append(f"{INDENT}}}")
    _comments(policy.closing, 1, out)
    out.append("}")


def _action_text(action: syntax.Action) -> str:
    if isinstance(action, syntax.Setting):
        return f"{action.key} = {format_value(action.value)}"
    return f"{'trigger' if isinstance(action, syntax.Trigger) else 'rebalance'} {action.target}"


def _action(action: syntax.Action, depth: int, out: list[str]) -> None:
    _comments(action.comments, depth, out)
    out.append(INDENT * depth + _with_trailing(_action_text(action), action.trailing))


def _rule(rule: syntax.Rule, out: list[str]) -> None:
    _comments(rule.comments, 2, out)
    head = f"when {rule.metric} {rule.op} {format_value(rule.threshold)}"
    if rule.window is not None:
        head += f" for {format_value(rule.window.length)} {rule.window.unit}"
    single = len(rule.actions) == 1 and not rule.actions[0].comments
    if not rule.trailing and not rule.closing and (single or not rule.actions):
        # The common one-action rule stays on one line, as MoE-PolicyLang writes it.
        body = f" {_action_text(rule.actions[0])} " if rule.actions else " "
        trailing = rule.actions[0].trailing if rule.actions else None
        out.append(INDENT * 2 + _with_trailing(f"{head} {{{body}}}", trailing))
        return
    out.append(INDENT * 2 + _with_trailing(f"{head} {{", rule.trailing))
    for action in rule.actions:
        _action(action, 3, out)
    _comments(rule.closing, 3, out)
    out.append(INDENT * 2 + "}")
