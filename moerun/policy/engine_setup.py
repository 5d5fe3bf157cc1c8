"""Compiled policy -> engine setup: everything a policy decides about how the engine and runtime run.

The last stage of the language pipeline (text -> syntax tree -> diagnostics -> IR -> engine setup).
:func:`engine_setup` turns a :class:`~moerun.policy.ir.CompiledPolicy` and the model's shape into an
:class:`EngineSetup`: the native engine's config (every key of csrc/policy_engine_binding.cpp's
``kConfigKeys``, names turned into enum values), plus the switches the runtime reads (lookahead
prediction, measured timings for the cost model, the learned predictor's file, the host tier). The
live runtime (moerun.loader, moerun.runtime.offload) and trace replay (moerun.trace.replay) both build
their engine from it, so replay runs the engine the runtime runs. A policy that cannot run on this
model fails here with a :class:`PolicyError` that names the numbers.

Like the rest of moerun.policy this module imports neither torch nor the native extension: it maps
names to the native enums by their position in ir.py's lists, which a test holds equal to the
native lists (``moerun._C.policy_vocabulary()``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import PolicyError
from .ir import (
    ADAPT_OPS,
    ADAPT_REBALANCES,
    ADAPT_TRIGGERS,
    ALLOCATIONS,
    AUTO,
    ENGINE_PARAMS,
    EVICTIONS,
    METRICS,
    PREFETCH_STRATEGIES,
    REPLAY_ONLY_EVICTIONS,
    SCHEDULE_MODES,
    CompiledPolicy,
    HostConfig,
)

# Native enum values: a name's position in its list (the native Trigger enum lists the rebalances
# after the triggers, as "rebalance_<target>").
_ENUMS = {
    "cache.eviction": EVICTIONS + REPLAY_ONLY_EVICTIONS,
    "prefetch.strategy": PREFETCH_STRATEGIES,
    "schedule.mode": SCHEDULE_MODES,
    "per_layer.allocation": ALLOCATIONS,
}
TRIGGER_CODES = ADAPT_TRIGGERS + tuple(f"rebalance_{r}" for r in ADAPT_REBALANCES)


@dataclass(frozen=True)
class CostModel:
    """Starting numbers of the hybrid schedule's cost model; the engine re-estimates the bandwidth
    and the CPU's two rates (per expert, per token) from measured timings as the runtime runs."""

    h2d_gbps: float = 25.0                # host->GPU copy bandwidth
    cpu_us_per_expert: float = 300.0      # CPU time of one expert whatever its tokens (its weights read once)
    cpu_us_per_expert_token: float = 100.0  # and per token it runs (one token: 400 µs in all)
    copy_latency_us: float = 10.0         # fixed cost of one copy
    gpu_layer_us: float = 50.0            # GPU compute of one MoE layer step
    ema: float = 0.2                      # weight of each new observation in the re-estimate


@dataclass(frozen=True)
class HostTier:
    """The host pool as the policy's ``host`` block sets it (no block: every expert, lru)."""

    capacity: int                         # experts in pinned memory; AUTO = every expert (no disk tier)
    eviction: int                         # native Eviction value
    high_watermark: float
    low_watermark: float


@dataclass(frozen=True)
class EngineSetup:
    """What a policy sets up on one model (see the module docstring)."""

    config: dict                          # the native engine's config: every key, nothing else
    lookahead: bool                       # apply the next MoE layer's router after each layer (prefetch_ahead)
    observe_timings: bool                 # feed measured copy and CPU times to the cost model (hybrid)
    predictor: str | None                 # the predictor file learned prefetch runs (None: none named)
    prefetch_strategy: str
    prediction_depth: int                 # MoE layers ahead a predictor scores (prefetch.lookahead)
    host: HostTier
    policy_name: str

    def live_predictor(self) -> str | None:
        """The predictor file the live runtime runs; PolicyError under learned prefetch without one
        (replay can feed learned prefetch the trace's true routing instead)."""
        if self.prefetch_strategy == "learned" and self.predictor is None:
            raise PolicyError(f"policy '{self.policy_name}' prefetches with strategy learned but names no "
                              'predictor; to run live it needs one: prefetch { predictor = "FILE" } (train it '
                              "with `moerun trace predictor`)")
        return self.predictor


def enum_code(param: str, value: str) -> int:
    """The native enum value of ``value`` for ``param`` (``cache.eviction``, ``prefetch.strategy``,
    ``schedule.mode``, ``per_layer.allocation``); PolicyError for an unknown name."""
    names = _ENUMS[param]
    if value not in names:
        raise PolicyError(f"unknown {param} '{value}'; expected one of {', '.join(names)}")
    return names.index(value)


def host_tier(host: HostConfig | None) -> HostTier:
    """The host pool's tier from a policy's ``host`` block (None: every expert in pinned memory)."""
    h = host or HostConfig()
    return HostTier(capacity=h.capacity, eviction=enum_code("cache.eviction", h.eviction),
                    high_watermark=h.high_watermark, low_watermark=h.low_watermark)


def engine_setup(policy: CompiledPolicy, *, num_layers: int, num_experts: int, top_k: int, num_slots: int,
                 expert_bytes: int, cost: CostModel | None = None, replay: bool = False) -> EngineSetup:
    """The engine setup of ``policy`` on a model of ``num_layers`` MoE layers, ``num_experts`` experts
    (``top_k`` routed per token) with ``num_slots`` GPU slots of ``expert_bytes``; ``replay``: for
    offline trace replay (which alone runs replay-only policies). Raises PolicyError when the policy
    cannot run here."""
    for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("top_k", top_k),
                        ("num_slots", num_slots)):
        if value <= 0:
            raise PolicyError(f"{name} must be positive, got {value}")
    if top_k > num_experts:
        raise PolicyError(f"top_k {top_k} exceeds num_experts {num_experts}")
    c, pf, sc = policy.cache, policy.prefetch, policy.schedule
    capacity = num_slots if c.capacity == AUTO else c.capacity
    if capacity > num_slots:
        raise PolicyError(f"policy '{policy.name}' ({policy.source}) asks for cache capacity {capacity} "
                          f"but only {num_slots} GPU expert slots are available; lower `capacity` or use "
                          "`capacity = auto`, or raise the VRAM budget")
    if not replay:
        if c.eviction in REPLAY_ONLY_EVICTIONS:
            raise PolicyError(f"policy '{policy.name}': eviction '{c.eviction}' needs the future of the "
                              "trace, so only `moerun trace replay` can run it; pick one of " + ", ".join(EVICTIONS))
        if c.capacity_factor > 0:
            raise PolicyError(f"policy '{policy.name}': capacity_factor drops the routed tokens over an expert's "
                              "capacity, which changes the model's output, so only `moerun trace replay` runs it; "
                              "remove it to run the model")
    pinned = []
    for layer, expert in c.pin:
        if not (-1 <= layer < num_layers) or not (0 <= expert < num_experts):
            raise PolicyError(f"pin ({layer}, {expert}) is outside the model: {num_layers} MoE layers, "
                              f"{num_experts} experts")
        layers = range(num_layers) if layer == -1 else (layer,)
        pinned += [l * num_experts + expert for l in layers]
    config = dict(
        num_layers=num_layers, num_experts=num_experts, top_k=top_k, num_slots=num_slots,
        expert_bytes=int(expert_bytes), capacity=capacity, eviction=enum_code("cache.eviction", c.eviction),
        frequency_decay=c.frequency_decay, freq_threshold=c.freq_threshold, freq_window=c.freq_window,
        score_ema_alpha=c.score_ema_alpha, pinned_keys=pinned, ttl=c.ttl,
        high_watermark=c.high_watermark, low_watermark=c.low_watermark, credit_decay=c.credit_decay,
        memory_budget_gb=c.memory_budget_gb, memory_threshold=c.memory_threshold,
        memory_headroom=c.memory_headroom, expert_size_gb=c.expert_size_gb, capacity_factor=c.capacity_factor,
        prefetch=enum_code("prefetch.strategy", pf.strategy), prefetch_budget=pf.budget,
        lookahead=pf.lookahead, affinity_threshold=pf.affinity_threshold,
        history_window=pf.history_window, schedule=enum_code("schedule.mode", sc.mode),
        offload_threshold_ms=sc.offload_threshold_ms, priority_routing=sc.priority_routing,
        prefill_staging=sc.prefill_staging, prefill_updates_cache=sc.prefill_updates_cache,
        per_layer=False, allocation=0, total_budget=capacity, min_capacity=1, max_capacity=0,
        rebalance_interval=0, entropy_window=1000,
        rules=[_rule(policy, r) for r in policy.adapt], cost=asdict(cost or CostModel()),
    )
    pl = policy.per_layer
    if pl is not None:
        total = capacity if pl.total_budget == AUTO else pl.total_budget
        if total > num_slots:
            raise PolicyError(f"per_layer total_budget {total} exceeds the {num_slots} GPU expert slots available")
        if pl.min_capacity * num_layers > total:
            raise PolicyError(f"per_layer min_capacity {pl.min_capacity} x {num_layers} layers = "
                              f"{pl.min_capacity * num_layers} exceeds total_budget {total}")
        config.update(per_layer=True, allocation=enum_code("per_layer.allocation", pl.allocation),
                      total_budget=total, min_capacity=pl.min_capacity, max_capacity=pl.max_capacity,
                      rebalance_interval=pl.rebalance_interval, entropy_window=pl.entropy_window)
    return EngineSetup(config=config, lookahead=pf.strategy == "lookahead", observe_timings=sc.mode == "hybrid",
                       predictor=pf.predictor or None, prefetch_strategy=pf.strategy,
                       prediction_depth=pf.lookahead, host=host_tier(policy.host), policy_name=policy.name)


def _rule(policy: CompiledPolicy, rule) -> dict:
    if rule.metric not in METRICS:
        raise PolicyError(f"adapt rule metric '{rule.metric}' is not one of {', '.join(METRICS)}")
    assignments = []
    for name, value in rule.assignments:
        if name not in ENGINE_PARAMS:
            raise PolicyError(f"policy '{policy.name}': the engine cannot change '{name}' at run time; "
                              f"adaptable: {', '.join(ENGINE_PARAMS)}")
        if name in _ENUMS:
            value = enum_code(name, str(value))
            if name == "cache.eviction" and value >= len(EVICTIONS):
                raise PolicyError("an adapt rule cannot switch to a replay-only eviction")
        assignments.append((ENGINE_PARAMS.index(name), float(value)))
    triggers = [TRIGGER_CODES.index(t) for t in rule.triggers]
    triggers += [TRIGGER_CODES.index(f"rebalance_{r}") for r in rule.rebalances]
    return dict(metric=METRICS.index(rule.metric), op=ADAPT_OPS.index(rule.op), threshold=float(rule.threshold),
                window=max(1, int(rule.window)), assignments=assignments, triggers=triggers)
