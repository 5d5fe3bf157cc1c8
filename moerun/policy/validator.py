"""Semantic checks of a parsed policy file; every independent problem is reported at once.

The parser accepts any ``NAME { key = value }``; this module decides what is meaningful: known
blocks and keys (with "did you mean"), types and ranges from :mod:`moerun.policy.schema`, and the
rules that tie settings together (a strategy's parameters need that strategy, budgets fit the
capacity, watermarks are ordered, adapt rules set only adaptable parameters, ...). When the model
shape is known (``num_layers``/``num_experts``) the checks that need it run too.
"""
from __future__ import annotations

import math
from collections import defaultdict

from . import ir, schema, syntax
from .errors import DiagnosticSink, did_you_mean

# MoE-PolicyLang files say `version 0.6`, `0.7`, ...: every version up to 1 is this language.
MAX_VERSION = 1
# Metrics that are fractions, so an adapt threshold outside [0, 1] can never be crossed.
RATE_METRICS = ("hit_rate", "miss_rate", "eviction_rate", "prefetch_accuracy", "cpu_share", "drift",
                "utilization_gini")
WINDOW_UNITS = ("accesses",)

# Settings that only mean something under one choice of another setting:
# (block, key) -> ((block, key) of the chooser, values that give the setting a meaning).
REQUIRES = {
    ("cache", "frequency_decay"): (("cache", "eviction"), ("lfu",)),
    ("cache", "freq_threshold"): (("cache", "eviction"), ("freq_threshold",)),
    ("cache", "freq_window"): (("cache", "eviction"), ("freq_threshold",)),
    ("cache", "score_ema_alpha"): (("cache", "eviction"), ("score",)),
    ("cache", "high_watermark"): (("cache", "eviction"), ("watermark",)),
    ("cache", "low_watermark"): (("cache", "eviction"), ("watermark",)),
    ("cache", "credit_decay"): (("cache", "eviction"), ("watermark",)),
    ("schedule", "offload_threshold_ms"): (("schedule", "mode"), ("hybrid",)),
    # cpu_fallback computes every prefill miss on the CPU: nothing is staged.
    ("schedule", "prefill_staging"): (("schedule", "mode"), ("hybrid", "gpu_only")),
    ("prefetch", "predictor"): (("prefetch", "strategy"), ("learned",)),
}
# MoE-PolicyLang extensions this runtime does not implement, with what to write instead.
_TIERS_HINT = ("multi-tier (mixed dtype) expert caches are not supported; the pinned host tier is "
               "written host { capacity = N }")
UNSUPPORTED_BLOCKS = {"hierarchy": _TIERS_HINT, "per_layer_hierarchy": _TIERS_HINT}
DEFAULTS = {("cache", "eviction"): "lru", ("prefetch", "strategy"): "none", ("schedule", "mode"): "gpu_only"}

# Whole numbers the native engine holds (csrc/policy_engine.h, EngineConfig): a value beyond its
# field's type would wrap or fail to convert, so it is rejected here with the limit. `int` fields
# by default; these are int64_t. Adapt rules pass values to the engine as doubles, exact up to 2**53.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
ADAPT_INT_MAX = 2**53
INT64_SETTINGS = {("cache", "ttl"), ("per_layer", "rebalance_interval"), ("host", "capacity")}
RULE_WINDOW_MAX = INT64_MAX  # `for N accesses` (AdaptRule::window is int64_t)


def int_limit(what: str, adapt: bool = False) -> int:
    """The largest whole number the engine holds for the setting ``block.key``."""
    block, _, key = what.partition(".")
    limit = INT64_MAX if (block, key) in INT64_SETTINGS else INT32_MAX
    return min(limit, ADAPT_INT_MAX) if adapt else limit


def validate(policy_file: syntax.PolicyFile, *, num_layers: int | None = None,
             num_experts: int | None = None) -> syntax.PolicyFile:
    """Check ``policy_file``; returns it unchanged or raises one PolicyError listing every problem.

    ``num_layers``/``num_experts`` (the model's MoE layer and routed-expert counts) enable the
    checks that depend on the model: pinned ids in range, budgets against layers x min_capacity.
    """
    sink = DiagnosticSink(policy_file.filename, policy_file.source)
    _Checker(sink, num_layers, num_experts).file(policy_file)
    sink.raise_if_any()
    return policy_file


class _Checker:
    def __init__(self, sink: DiagnosticSink, num_layers: int | None, num_experts: int | None):
        self.sink = sink
        self.error = sink.error
        self.num_layers = num_layers
        self.num_experts = num_experts
        # Blocks with an unknown key or a bad value: rules that depend on their choices are
        # skipped, so one typo yields one error rather than a cascade.
        self.broken: set[str] = set()

    # -- file ----------------------------------------------------------------------------------------
    def file(self, f: syntax.PolicyFile) -> None:
        if f.version is not None:
            number = f.version.number
            if not 0 < number.value <= MAX_VERSION:
                self.error(f"unsupported language version {number.value}", f.version.span,
                           f"this moerun reads versions up to {MAX_VERSION}")
        if not f.policies:
            self.error("the file defines no policy", hint="write: policy NAME { cache { capacity = auto } }")
        seen: dict[str, syntax.Policy] = {}
        for policy in f.policies:
            if policy.name in seen:
                self.error(f"policy '{policy.name}' is defined twice", policy.span,
                           f"first defined on line {seen[policy.name].span.line}; rename one of them")
            seen.setdefault(policy.name, policy)
            self.policy(policy)

    # -- one policy ----------------------------------------------------------------------------------
    def policy(self, policy: syntax.Policy) -> None:
        self.broken = set()
        values: dict[tuple[str, str], object] = {}      # (block, key) -> checked value
        spans: dict[tuple[str, str], syntax.Span] = {}
        seen_sections: dict[str, syntax.Section] = {}
        for section in policy.sections:
            if section.name not in schema.SECTION_NAMES:
                hint = (UNSUPPORTED_BLOCKS[section.name] if section.name in UNSUPPORTED_BLOCKS
                        else did_you_mean(section.name, schema.SECTION_NAMES))
                self.error(f"unknown block '{section.name}'", section.span, hint)
                continue
            if section.name in seen_sections:
                self.error(f"block '{section.name}' appears twice in policy '{policy.name}'", section.span,
                           f"merge it into the first one (line {seen_sections[section.name].span.line})")
                continue
            seen_sections[section.name] = section
            if isinstance(section, syntax.Block):
                self.block(section, values, spans)
        if "cache" not in seen_sections and "per_layer" not in seen_sections:
            self.error(f"policy '{policy.name}' has neither a cache nor a per_layer block", policy.span,
                       "add: cache { capacity = auto }")
        adapt = seen_sections.get("adapt")
        adapted = self.adapt(adapt, values, seen_sections) if isinstance(adapt, syntax.AdaptBlock) else {}
        self.cross_checks(values, spans, adapted, seen_sections)

    def block(self, block: syntax.Block, values: dict, spans: dict) -> None:
        params = schema.BLOCKS[block.name]
        if not block.settings:
            self.error(f"block '{block.name}' is empty", block.span,
                       f"set at least one of: {', '.join(params)}; or remove the block")
        for setting in block.settings:
            if setting.key not in params:
                self.error(f"unknown key '{setting.key}' in block '{block.name}'", setting.span,
                           did_you_mean(setting.key, params))
                self.broken.add(block.name)
                continue
            where = (block.name, setting.key)
            if where in spans:
                self.error(f"'{setting.key}' is set twice in block '{block.name}'", setting.span,
                           f"first set on line {spans[where].line}; keep one")
                continue
            spans[where] = setting.span
            checked = self.value(params[setting.key], setting.value, f"{block.name}.{setting.key}")
            if checked is not None:
                values[where] = checked
            else:
                self.broken.add(block.name)

    # -- values --------------------------------------------------------------------------------------
    def value(self, param: schema.Param, value: syntax.Value, what: str, adapt: bool = False):
        """The checked Python value, or None after reporting why it is unusable (``adapt``: the
        value an adapt rule assigns)."""
        kind = param.kind
        if kind in ("int", "float"):
            if isinstance(value, syntax.Word) and value.text == "auto":
                if param.auto:
                    return ir.AUTO
                self.error(f"'{what}' cannot be auto", value.span, f"give a number {param.describe_range()}")
                return None
            if not isinstance(value, syntax.Number):
                self.error(f"'{what}' must be a number", value.span,
                           f"give a number {param.describe_range()}" + (" or auto" if param.auto else ""))
                return None
            number = value.value
            if isinstance(number, float) and not math.isfinite(number):
                self.error(f"'{what}' must be finite", value.span, f"give a number {param.describe_range()}")
                return None
            if kind == "int" and not isinstance(number, int):
                self.error(f"'{what}' must be a whole number, got {number}", value.span,
                           f"write it without a decimal point, {param.describe_range()}")
                return None
            if not self.in_range(param, number):
                self.error(f"'{what}' = {number} is out of range", value.span,
                           f"'{what}' must be {param.describe_range()}")
                return None
            if kind == "int" and number > int_limit(what, adapt):
                limit = int_limit(what, adapt)
                why = " in an adapt rule (its values pass as doubles)" if limit < int_limit(what) else ""
                self.error(f"'{what}' = {number} is larger than the engine can hold", value.span,
                           f"'{what}' must be at most {limit}{why}")
                return None
            return float(number) if kind == "float" else number
        if kind in ("enum", "bool"):
            choices = param.choices if kind == "enum" else ("true", "false")
            if not isinstance(value, syntax.Word):
                self.error(f"'{what}' must be one of: {', '.join(choices)}", value.span)
                return None
            if value.text not in choices:
                self.error(f"unknown value '{value.text}' for '{what}'", value.span,
                           did_you_mean(value.text, choices))
                return None
            return value.text == "true" if kind == "bool" else value.text
        if kind == "metrics":
            return self.metric_list(value, what)
        if kind == "path":
            if not isinstance(value, syntax.String) or not value.text.strip():
                self.error(f"'{what}' must be a file path in double quotes", value.span,
                           f'write: {what.rpartition(".")[2]} = "experts.npz"')
                return None
            return value.text
        return self.pin_list(value, what)

    @staticmethod
    def in_range(param: schema.Param, number: float) -> bool:
        if param.lo is not None and (number < param.lo or (param.lo_open and number == param.lo)):
            return False
        if param.hi is not None and (number > param.hi or (param.hi_open and number == param.hi)):
            return False
        return True

    def metric_list(self, value: syntax.Value, what: str):
        if not isinstance(value, syntax.List):
            self.error(f"'{what}' must be a list like [hit_rate, cpu_share]", value.span)
            return None
        names: list[str] = []
        for item in value.items:
            if not isinstance(item, syntax.Word):
                self.error(f"'{what}' lists metric names, not numbers", item.span,
                           "expected one of: " + ", ".join(ir.METRICS))
            elif schema.resolve_metric(item.text) not in ir.METRICS:
                self.error(f"unknown metric '{item.text}'", item.span, did_you_mean(item.text, ir.METRICS))
            elif schema.resolve_metric(item.text) in names:
                self.error(f"metric '{item.text}' is listed twice", item.span, "list each metric once")
            else:
                names.append(schema.resolve_metric(item.text))
        return tuple(names)

    def pin_list(self, value: syntax.Value, what: str):
        if not isinstance(value, syntax.List):
            self.error(f"'{what}' must be a list like [3, 7] or [0:3, 1:7]", value.span,
                       "EXPERT pins that expert in every layer; LAYER:EXPERT pins one")
            return None
        pins: list[tuple[int, int]] = []
        for item in value.items:
            parts = (item.first, item.second) if isinstance(item, syntax.Pair) else (item,)
            if not all(isinstance(p, syntax.Number) and isinstance(p.value, int) and 0 <= p.value <= INT32_MAX
                       for p in parts):
                self.error(f"'{what}' entries must be expert ids (whole numbers in 0..{INT32_MAX}) or LAYER:EXPERT",
                           item.span)
                continue
            pin = (parts[0].value, parts[1].value) if len(parts) == 2 else (-1, parts[0].value)
            if pin in pins:
                self.error(f"expert {_pin_text(pin)} is pinned twice", item.span, "list each pin once")
                continue
            layer, expert = pin
            if self.num_experts is not None and expert >= self.num_experts:
                self.error(f"pinned expert {expert} does not exist: the model has {self.num_experts} experts "
                           "per layer", item.span, f"use ids 0..{self.num_experts - 1}")
                continue
            if self.num_layers is not None and layer >= self.num_layers:
                self.error(f"pinned layer {layer} does not exist: the model has {self.num_layers} MoE layers",
                           item.span, f"use layers 0..{self.num_layers - 1}")
                continue
            pins.append(pin)
        return tuple(pins)

    # -- adapt ---------------------------------------------------------------------------------------
    def adapt(self, block: syntax.AdaptBlock, values: dict, sections: dict) -> dict[tuple[str, str], set]:
        """Checks the rules; returns (block, key) -> the values the rules may switch it to."""
        adapted: dict[tuple[str, str], set] = defaultdict(set)
        if not block.rules:
            self.error("adapt block has no rules", block.span,
                       "write: when hit_rate < 0.4 for 100 accesses { eviction = lru }")
        for rule in block.rules:
            metric = schema.resolve_metric(rule.metric)
            if metric not in ir.METRICS:
                self.error(f"unknown metric '{rule.metric}'", rule.span, did_you_mean(rule.metric, ir.METRICS))
            threshold = rule.threshold.value
            if not math.isfinite(threshold):
                self.error("the threshold must be finite", rule.threshold.span)
            elif metric in RATE_METRICS and not 0.0 <= threshold <= 1.0:
                self.error(f"'{rule.metric}' is a fraction; threshold {threshold} can never be crossed",
                           rule.threshold.span, "use a value in [0, 1]")
            elif threshold < 0:
                self.error(f"'{rule.metric}' is never negative; threshold {threshold} can never be crossed",
                           rule.threshold.span, "use a value >= 0")
            if rule.window is not None:
                length = rule.window.length
                if not isinstance(length.value, int) or not 1 <= length.value <= RULE_WINDOW_MAX:
                    self.error(f"the window must be a whole number of accesses in 1..{RULE_WINDOW_MAX}, "
                               f"got {length.value}", length.span)
                if rule.window.unit not in WINDOW_UNITS:
                    self.error(f"unknown window unit '{rule.window.unit}'", rule.window.unit_span,
                               did_you_mean(rule.window.unit, WINDOW_UNITS))
            if not rule.actions:
                self.error(f"the rule on '{rule.metric}' does nothing", rule.span,
                           "give it an action: { eviction = lru }, trigger X or rebalance per_layer")
            self.actions(rule, values, sections, adapted)
        return adapted

    def actions(self, rule: syntax.Rule, values: dict, sections: dict, adapted: dict) -> None:
        assigned: set[str] = set()
        for action in rule.actions:
            if isinstance(action, syntax.Trigger):
                self.trigger(action, values)
            elif isinstance(action, syntax.Rebalance):
                target = schema.REBALANCE_ALIASES.get(action.target, action.target)
                if target not in ir.ADAPT_REBALANCES:
                    self.error(f"cannot rebalance '{action.target}'", action.span,
                               did_you_mean(action.target, ir.ADAPT_REBALANCES))
                elif target not in sections:
                    self.error(f"'rebalance {action.target}' needs a {target} block", action.span,
                               f"add: {target} {{ allocation = entropy }}")
            else:
                qualified = schema.resolve_adapt_key(action.key)
                if qualified is None:
                    names = sorted(set(schema.ADAPTABLE) | {k.split(".")[1] for k in schema.ADAPTABLE})
                    self.error(f"unknown parameter '{action.key}' in adapt rule", action.span,
                               did_you_mean(action.key, names))
                    continue
                if qualified not in schema.ADAPTABLE:
                    self.error(f"'{qualified}' cannot change at run time", action.span,
                               "an adapt rule may set: " + ", ".join(schema.ADAPTABLE))
                    continue
                if qualified in assigned:
                    self.error(f"'{qualified}' is set twice in one rule", action.span, "keep one")
                    continue
                assigned.add(qualified)
                checked = self.value(schema.ADAPTABLE[qualified], action.value, qualified, adapt=True)
                if checked is not None:
                    block, _, key = qualified.partition(".")
                    adapted[(block, key)].add(checked)

    def trigger(self, action: syntax.Trigger, values: dict) -> None:
        target = schema.TRIGGER_ALIASES.get(action.target, action.target)
        if target not in ir.ADAPT_TRIGGERS:
            self.error(f"unknown trigger '{action.target}'", action.span,
                       did_you_mean(action.target, ir.ADAPT_TRIGGERS))
        elif target == "evict_ttl" and not values.get(("cache", "ttl")):
            self.error("'trigger evict_ttl' needs a ttl", action.span, "set cache { ttl = N } with N > 0")

    # -- rules across settings -----------------------------------------------------------------------
    def cross_checks(self, values: dict, spans: dict, adapted: dict, sections: dict) -> None:
        def get(block: str, key: str, default=None):
            return values.get((block, key), default)

        for where, (chooser, allowed) in REQUIRES.items():
            if where not in values or chooser[0] in self.broken:
                continue
            reachable = {get(*chooser, DEFAULTS[chooser])} | adapted.get(chooser, set())
            if not reachable & set(allowed):
                # Name every value that gives the setting a meaning (gpu_only, the default, may be one).
                choices = " or ".join(allowed)
                self.error(f"'{where[1]}' has no effect unless {chooser[0]}.{chooser[1]} = {choices}",
                           spans[where], f"set {chooser[1]} = {choices}, or remove '{where[1]}'")

        for block in ("cache", "host"):
            low, high = get(block, "low_watermark"), get(block, "high_watermark")
            if low is not None and high is not None and low >= high:
                self.error(f"{block}.low_watermark ({low}) must be below high_watermark ({high})",
                           spans[(block, "low_watermark")], "eviction runs from the high mark down to the low one")

        if not get("cache", "memory_budget_gb"):
            for key in ("memory_threshold", "memory_headroom"):
                if ("cache", key) in values:
                    self.error(f"'{key}' has no effect without a memory budget", spans[("cache", key)],
                               "set memory_budget_gb > 0, or remove it")

        strategy, budget = get("prefetch", "strategy", "none"), get("prefetch", "budget")
        if "prefetch" in self.broken:
            strategy = None  # unknown: the budget rule does not apply
        # (A budget with strategy = none is allowed: MoE-PolicyLang files write it that way.)
        if strategy not in (None, "none") and budget == 0:
            self.error(f"prefetch strategy {strategy} with budget 0 never prefetches", spans[("prefetch", "budget")],
                       "give a budget >= 1, or set strategy = none")

        capacity = get("cache", "capacity")
        if budget and capacity and budget > capacity:
            self.error(f"prefetch budget {budget} exceeds the cache capacity {capacity}",
                       spans[("prefetch", "budget")], "prefetched experts need slots: lower the budget")

        pins = get("cache", "pin", ())
        if pins and capacity:
            layers = self.num_layers or 1
            pinned = sum(layers if layer < 0 else 1 for layer, _ in pins)
            if pinned > capacity:
                self.error(f"{pinned} pinned experts do not fit in capacity {capacity}", spans[("cache", "pin")],
                           "pin fewer experts or raise the capacity")

        if capacity and self.num_layers and self.num_experts and capacity > self.num_layers * self.num_experts:
            self.error(f"capacity {capacity} exceeds the model's {self.num_layers * self.num_experts} routed experts",
                       spans[("cache", "capacity")], "use capacity = auto or a smaller number")

        host_capacity = get("host", "capacity")
        if host_capacity and capacity and host_capacity < capacity:
            self.error(f"host capacity {host_capacity} is below the GPU cache capacity {capacity}",
                       spans[("host", "capacity")], "the host pool feeds the GPU cache: make it at least as large")

        if "per_layer" in sections:
            self.per_layer(values, spans, capacity)

    def per_layer(self, values: dict, spans: dict, capacity) -> None:
        low, high = values.get(("per_layer", "min_capacity"), 1), values.get(("per_layer", "max_capacity"))
        total = values.get(("per_layer", "total_budget"))
        if high is not None and low > high:
            self.error(f"per_layer min_capacity ({low}) exceeds max_capacity ({high})",
                       spans[("per_layer", "min_capacity")], "make min_capacity <= max_capacity")
        if total:
            if total < low:
                self.error(f"total_budget {total} is below min_capacity {low}", spans[("per_layer", "total_budget")],
                           "every layer gets at least min_capacity slots")
            elif self.num_layers and total < self.num_layers * low:
                self.error(f"total_budget {total} cannot give {self.num_layers} layers {low} slots each",
                           spans[("per_layer", "total_budget")],
                           f"raise it to >= {self.num_layers * low} or lower min_capacity")
            if self.num_layers and high is not None and total > self.num_layers * high:
                self.error(f"total_budget {total} exceeds {self.num_layers} layers x max_capacity {high}",
                           spans[("per_layer", "total_budget")], "the extra slots could never be used")
        if high is not None and self.num_experts and high > self.num_experts:
            self.error(f"max_capacity {high} exceeds the {self.num_experts} experts of a layer",
                       spans[("per_layer", "max_capacity")], f"use at most {self.num_experts}")


def _pin_text(pin: tuple[int, int]) -> str:
    layer, expert = pin
    return str(expert) if layer < 0 else f"{layer}:{expert}"
