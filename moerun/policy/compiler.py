"""Syntax tree -> IR: :class:`moerun.policy.ir.CompiledPolicy`, the typed policy the engine setup reads.

Runs on a validated syntax tree (see :func:`compile_ir`); every key maps to the IR field of the same
name in the block's dataclass, so the schema table and ir.py are the whole mapping.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import ir, schema, syntax
from .errors import DiagnosticSink, PolicyError
from .validator import validate

# Prefetch budget when a strategy is chosen without one (MoE-PolicyLang files often omit it).
DEFAULT_PREFETCH_BUDGET = 4

_BLOCK_CONFIGS = {
    "cache": ir.CacheConfig, "prefetch": ir.PrefetchConfig, "schedule": ir.ScheduleConfig,
    "monitor": ir.MonitorConfig, "per_layer": ir.PerLayerConfig, "host": ir.HostConfig,
}


def compile_ir(policy_file: syntax.PolicyFile, name: str | None = None, *, num_layers: int | None = None,
               num_experts: int | None = None) -> ir.CompiledPolicy:
    """Validate ``policy_file`` and compile the policy called ``name`` (which may be left out when the
    file defines one policy)."""
    validate(policy_file, num_layers=num_layers, num_experts=num_experts)
    return compile_policy_ir(select(policy_file, name), source=policy_file.filename)


def select(policy_file: syntax.PolicyFile, name: str | None) -> syntax.Policy:
    """The policy called ``name``, or the file's only policy; PolicyError listing the names otherwise.

    Every caller that needs one policy comes here (``compile_policy``, so moerun.load, set_policy and
    ``moerun trace replay``): a file of several with no name is refused rather than run as its first, which
    the user may not have meant. (``moerun trace sweep`` names each policy of such a file itself.)"""
    if name is None:
        if len(policy_file.policies) == 1:
            return policy_file.policies[0]
        names = [p.name for p in policy_file.policies]
        sink = DiagnosticSink(policy_file.filename, policy_file.source)
        on_command_line = "FILE" if policy_file.filename == "<string>" else policy_file.filename
        sink.error(f"{len(names)} policies are defined here ({', '.join(names)}) and one is needed; none is "
                   "chosen by default", policy_file.policies[1].span,
                   f"name one: moerun.policy.compile_policy(file, name='{names[1]}') for moerun.load(policy=...) "
                   f"and set_policy(...), `{on_command_line}:{names[1]}` (FILE:NAME) for moerun trace replay and sweep (sweep "
                   f"takes a file of several as each of them), `moerun policy explain --name {names[1]}` shows "
                   "one; or keep one policy per file")
        sink.raise_if_any()
    for policy in policy_file.policies:
        if policy.name == name:
            return policy
    names = [p.name for p in policy_file.policies]
    raise PolicyError(f"{policy_file.filename}: no policy named '{name}'; it defines {', '.join(names)}")


def compile_policy_ir(policy: syntax.Policy, source: str = "<string>") -> ir.CompiledPolicy:
    """Compile one validated policy (no checks here: call validate first)."""
    blocks = {}
    for section in policy.sections:
        if isinstance(section, syntax.Block):
            params = schema.BLOCKS[section.name]
            fields = {s.key: _python_value(params[s.key], s.value) for s in section.settings}
            blocks[section.name] = fields
    prefetch = blocks.get("prefetch", {})
    if prefetch.get("predictor"):
        prefetch["predictor"] = _resolve_path(prefetch["predictor"], source)
    if prefetch.get("strategy", "none") != "none" and "budget" not in prefetch:
        capacity = blocks.get("cache", {}).get("capacity", ir.AUTO)
        budget = DEFAULT_PREFETCH_BUDGET
        prefetch["budget"] = min(budget, capacity) if capacity != ir.AUTO else budget
    built = {name: _BLOCK_CONFIGS[name](**fields) for name, fields in blocks.items()}
    monitor = built.get("monitor", ir.MonitorConfig())
    adapt = policy.section("adapt")
    rules = tuple(_rule(r, monitor.window) for r in adapt.rules) if isinstance(adapt, syntax.AdaptBlock) else ()
    return ir.CompiledPolicy(
        name=policy.name,
        cache=built.get("cache", ir.CacheConfig()),
        prefetch=built.get("prefetch", ir.PrefetchConfig()),
        schedule=built.get("schedule", ir.ScheduleConfig()),
        monitor=monitor,
        adapt=rules,
        per_layer=built.get("per_layer"),
        host=built.get("host"),
        source=source,
    )


def _resolve_path(path: str, source: str) -> str:
    """A relative path in a policy file is relative to that file (else to the working directory)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and Path(source).is_file():
        p = Path(source).resolve().parent / p
    return str(p)


def _python_value(param: schema.Param, value: syntax.Value):
    if param.kind in ("int", "float"):
        if isinstance(value, syntax.Word):      # auto
            return ir.AUTO
        return float(value.value) if param.kind == "float" else int(value.value)
    if param.kind == "bool":
        return value.text == "true"
    if param.kind == "enum":
        return value.text
    if param.kind == "metrics":
        return tuple(schema.resolve_metric(item.text) for item in value.items)
    if param.kind == "path":
        return value.text
    return tuple((item.first.value, item.second.value) if isinstance(item, syntax.Pair) else (-1, item.value)
                 for item in value.items)


def _rule(rule: syntax.Rule, default_window: int) -> ir.AdaptRule:
    assignments, triggers, rebalances = [], [], []
    for action in rule.actions:
        if isinstance(action, syntax.Trigger):
            triggers.append(schema.TRIGGER_ALIASES.get(action.target, action.target))
        elif isinstance(action, syntax.Rebalance):
            rebalances.append(schema.REBALANCE_ALIASES.get(action.target, action.target))
        else:
            qualified = schema.resolve_adapt_key(action.key)
            assignments.append((qualified, _python_value(schema.ADAPTABLE[qualified], action.value)))
    window = rule.window.length.value if rule.window is not None else default_window
    return ir.AdaptRule(schema.resolve_metric(rule.metric), rule.op, float(rule.threshold.value), int(window),
                            tuple(assignments), tuple(triggers), tuple(rebalances))


def replace_param(policy: ir.CompiledPolicy, qualified: str, value) -> ir.CompiledPolicy:
    """``policy`` with one ``block.key`` changed (what an adapt rule does when it fires)."""
    block, _, key = qualified.partition(".")
    current = getattr(policy, block)
    if current is None:
        current = _BLOCK_CONFIGS[block]()
    return dataclasses.replace(policy, **{block: dataclasses.replace(current, **{key: value})})
