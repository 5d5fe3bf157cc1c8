"""The policy engine: a compiled policy turned into per-layer decisions, made by native code.

:class:`PolicyEngine` translates a :class:`~moerun.policy.config.CompiledPolicy` into the native
engine's config (``moerun._C.PolicyEngine``, see csrc/policy_engine.h) and checks it against the
model and the arena first, so a policy that cannot run fails with a :class:`PolicyError` naming the
numbers. The runtime and trace replay drive the SAME native engine, so replay predicts what the
runtime does. This module knows nothing about tensors or the arena: it speaks plain integers, and
the runtime mirrors each :class:`Plan` into the arena's slot table.

Call path: ``engine.step`` IS the native method (bound once in ``__init__``), so a step costs one
native call; it returns the same :class:`Plan` object every time (its buffers are reused), so read
the plan before the next step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from moerun.native import _C
from moerun.policy.config import (
    ADAPT_OPS,
    ADAPT_TRIGGERS,
    ALLOCATIONS,
    AUTO,
    EVICTIONS,
    METRICS,
    PREFETCH_STRATEGIES,
    REPLAY_ONLY_EVICTIONS,
    SCHEDULE_MODES,
    CompiledPolicy,
    HostConfig,
)
from moerun.policy.errors import PolicyError

Plan = _C.Plan
"""Decisions of one layer step (native; reused by the next step). Fields:

- ``hits``: ``[(expert, slot)]``
- ``fetches``: ``[(expert, slot, victim_layer, victim_expert)]`` (victim ``-1, -1`` if the slot was free)
- ``cpu``: ``[(expert,)]`` run on the CPU
- ``prefetches``: ``[(layer, expert, slot, victim_layer, victim_expert)]`` for later layers
- ``releases``: ``[(slot, layer, expert)]`` that leave the arena once this step's kernel is done
  (experts staged for one step, TTL/watermark/memory evictions, partition shrinks)
- ``num_hits``, ``num_fetches``, ``num_cpu``, ``num_prefetches``, ``num_releases``: counts (cheap)
- ``predicted_us``: the cost model's estimate of this layer step
"""

# Every vocabulary maps to the native enum by its position in the config.py tuple.
_EVICTION_CODES = {name: i for i, name in enumerate(EVICTIONS + REPLAY_ONLY_EVICTIONS)}
_ENUM_PARAMS = {
    "cache.eviction": _EVICTION_CODES,
    "prefetch.strategy": {n: i for i, n in enumerate(PREFETCH_STRATEGIES)},
    "schedule.mode": {n: i for i, n in enumerate(SCHEDULE_MODES)},
}


def eviction_code(name: str) -> int:
    """Native ``policy::Eviction`` value of an eviction name (the host pool's tier takes it too)."""
    return _EVICTION_CODES[name]


# Native Param enum (csrc/policy_engine.h), in order.
_PARAM_CODES = {
    name: i
    for i, name in enumerate((
        "cache.capacity", "cache.eviction", "cache.frequency_decay", "cache.freq_threshold",
        "cache.freq_window", "cache.score_ema_alpha", "cache.ttl", "cache.high_watermark",
        "cache.low_watermark", "cache.credit_decay", "cache.memory_budget_gb", "cache.memory_threshold",
        "cache.memory_headroom", "prefetch.strategy", "prefetch.budget", "prefetch.lookahead",
        "prefetch.affinity_threshold", "schedule.mode", "schedule.offload_threshold_ms",
        "schedule.priority_routing",
    ))
}
_TRIGGER_CODES = {name: i for i, name in enumerate(ADAPT_TRIGGERS)}
_REBALANCE_CODE = len(ADAPT_TRIGGERS)  # native Trigger::RebalancePerLayer


@dataclass(frozen=True)
class CostModel:
    """Starting numbers of the hybrid schedule's cost model; the engine re-estimates the bandwidth
    and the CPU rate from :meth:`PolicyEngine.observe_timing` as the runtime runs."""

    h2d_gbps: float = 25.0                # host->GPU copy bandwidth
    cpu_us_per_expert_token: float = 400.0  # CPU time of one expert for one token
    copy_latency_us: float = 10.0         # fixed cost of one copy
    gpu_layer_us: float = 50.0            # GPU compute of one MoE layer step
    ema: float = 0.2                      # weight of each new observation in the re-estimate


def native_config(policy: CompiledPolicy, *, num_layers: int, num_experts: int, top_k: int,
                  num_slots: int, expert_bytes: int, cost: CostModel | None = None,
                  replay: bool = False) -> dict:
    """The native engine's config dict for ``policy`` on this model; raises PolicyError when the
    policy cannot run here (capacity above the slots, belady outside replay, unknown names)."""
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
    if c.eviction in REPLAY_ONLY_EVICTIONS and not replay:
        raise PolicyError(f"policy '{policy.name}': eviction '{c.eviction}' needs the future of the "
                          "trace, so only `moerun trace replay` can run it; pick one of " + ", ".join(EVICTIONS))
    pinned = []
    for layer, expert in c.pin:
        if not (-1 <= layer < num_layers) or not (0 <= expert < num_experts):
            raise PolicyError(f"pin ({layer}, {expert}) is outside the model: {num_layers} MoE layers, "
                              f"{num_experts} experts")
        layers = range(num_layers) if layer == -1 else (layer,)
        pinned += [l * num_experts + expert for l in layers]
    d = dict(
        num_layers=num_layers, num_experts=num_experts, top_k=top_k, num_slots=num_slots,
        expert_bytes=int(expert_bytes), capacity=capacity, eviction=_code("cache.eviction", c.eviction),
        frequency_decay=c.frequency_decay, freq_threshold=c.freq_threshold, freq_window=c.freq_window,
        score_ema_alpha=c.score_ema_alpha, pinned_keys=pinned, ttl=c.ttl,
        high_watermark=c.high_watermark, low_watermark=c.low_watermark, credit_decay=c.credit_decay,
        memory_budget_gb=c.memory_budget_gb, memory_threshold=c.memory_threshold,
        memory_headroom=c.memory_headroom, expert_size_gb=c.expert_size_gb,
        prefetch=_code("prefetch.strategy", pf.strategy), prefetch_budget=pf.budget,
        lookahead=pf.lookahead, affinity_threshold=pf.affinity_threshold,
        history_window=pf.history_window, schedule=_code("schedule.mode", sc.mode),
        offload_threshold_ms=sc.offload_threshold_ms, priority_routing=sc.priority_routing,
        cost=asdict(cost or CostModel()),
    )
    pl = policy.per_layer
    if pl is not None:
        total = capacity if pl.total_budget == AUTO else pl.total_budget
        if total > num_slots:
            raise PolicyError(f"per_layer total_budget {total} exceeds the {num_slots} GPU expert slots available")
        if pl.min_capacity * num_layers > total:
            raise PolicyError(f"per_layer min_capacity {pl.min_capacity} x {num_layers} layers = "
                              f"{pl.min_capacity * num_layers} exceeds total_budget {total}")
        if pl.allocation not in ALLOCATIONS:
            raise PolicyError(f"unknown per_layer allocation '{pl.allocation}'; expected one of {ALLOCATIONS}")
        d.update(per_layer=True, allocation=ALLOCATIONS.index(pl.allocation), total_budget=total,
                 min_capacity=pl.min_capacity, max_capacity=pl.max_capacity,
                 rebalance_interval=pl.rebalance_interval, entropy_window=pl.entropy_window)
    d["rules"] = [_native_rule(policy, r) for r in policy.adapt]
    return d


def _code(param: str, value: str) -> int:
    codes = _ENUM_PARAMS[param]
    if value not in codes:
        raise PolicyError(f"unknown {param} '{value}'; expected one of {', '.join(codes)}")
    return codes[value]


def _native_rule(policy: CompiledPolicy, rule) -> dict:
    if rule.metric not in METRICS:
        raise PolicyError(f"adapt rule metric '{rule.metric}' is not one of {', '.join(METRICS)}")
    assignments = []
    for name, value in rule.assignments:
        if name not in _PARAM_CODES:
            raise PolicyError(f"policy '{policy.name}': the engine cannot change '{name}' at run time; "
                              f"adaptable: {', '.join(_PARAM_CODES)}")
        if name in _ENUM_PARAMS:
            value = _code(name, str(value))
            if name == "cache.eviction" and value >= len(EVICTIONS):
                raise PolicyError("an adapt rule cannot switch to a replay-only eviction")
        assignments.append((_PARAM_CODES[name], float(value)))
    triggers = [_TRIGGER_CODES[t] for t in rule.triggers] + [_REBALANCE_CODE for _ in rule.rebalances]
    return dict(metric=METRICS.index(rule.metric), op=ADAPT_OPS.index(rule.op), threshold=float(rule.threshold),
                window=max(1, int(rule.window)), assignments=assignments, triggers=triggers)


class PolicyEngine:
    """Decisions for one model under one policy (see the module docstring for the call path).

    ``step(layer, expert_ids, gate_weights) -> Plan``: ``expert_ids`` are the layer's T*K routed
    ids (a list/tuple of ints or an integer array; duplicates across tokens allowed: accesses count
    per (token, expert) pair, decisions are per unique expert), ``gate_weights`` the matching floats
    (or None). Raises ValueError for an id or layer out of range.
    """

    def __init__(self, policy: CompiledPolicy, *, num_layers: int, num_experts: int, top_k: int,
                 num_slots: int, expert_bytes: int, cost: CostModel | None = None, replay: bool = False):
        self.shape = dict(num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                          num_slots=num_slots, expert_bytes=expert_bytes)
        self.cost = cost or CostModel()
        self.replay_mode = replay
        self.policy = policy
        self._native = _C.PolicyEngine(native_config(policy, cost=self.cost, replay=replay, **self.shape))
        # (engine clock at the swap, policy): adapt firings name rules of the policy they fired under.
        self._policies: list[tuple[int, CompiledPolicy]] = [(0, policy)]
        self.step = self._native.step  # the hot call: no Python frame in between

    def observe_prediction(self, layer: int, expert_ids: Sequence[int],
                           scores: Sequence[float] | None = None) -> None:
        """Predicted ids for ``layer`` (lookahead: ranked; learned: with ``scores``), consumed by the
        next step of an earlier layer; accuracy against the real routing appears in stats."""
        self._native.observe_prediction(layer, expert_ids, scores)

    def prefetch_ahead(self, layer: int, expert_ids: Sequence[int], scores: Sequence[float] | None = None):
        """Lookahead between steps: ids predicted for ``layer`` (ranked) from the hidden state the step
        before it produced. Under ``lookahead`` prefetch the returned plan lists the prefetches issued
        (up to the budget, of ids not resident), and nothing else; under any strategy the ids count
        toward ``routing_prediction_accuracy``. The plan object is the one ``step`` returns, reused."""
        return self._native.prefetch_ahead(layer, expert_ids, scores)

    def observe_timing(self, layer: int, *, layer_us: float, copy_us: float = 0.0, copy_bytes: int = 0,
                       cpu_us: float = 0.0, cpu_expert_tokens: int = 0) -> None:
        """Measured times of ``layer``'s last step: re-estimates the cost model (bandwidth from
        ``copy_bytes / copy_us``, CPU rate from ``cpu_us / cpu_expert_tokens``) and scores its
        prediction (``stats()['cost_prediction_error']``)."""
        self._native.observe_timing(layer, layer_us, copy_us, copy_bytes, cpu_us, cpu_expert_tokens)

    def set_policy(self, policy: CompiledPolicy) -> None:
        """Hot swap: new parameters from the next step; cache contents kept (a smaller capacity
        evicts, reported in the next plan's ``releases``)."""
        self._native.set_config(native_config(policy, cost=self.cost, replay=self.replay_mode, **self.shape))
        self._policies.append((self._native.stats()["accesses"], policy))
        self.policy = policy

    def warm(self, layer: int, expert: int) -> int:
        """Place (layer, expert) in a free slot of its partition without counting an access (start-up
        fill of an arena that holds every expert); its slot, or -1 when resident or without room."""
        return self._native.warm(layer, expert)

    def lookup(self, layer: int, expert: int) -> int:
        """Slot holding (layer, expert), -1 when not resident."""
        return self._native.lookup(layer, expert)

    def metric(self, name: str, window: int) -> float:
        """A monitor metric over the last ``window`` accesses (NaN until that many have passed)."""
        if name not in METRICS:
            raise ValueError(f"unknown metric '{name}'; expected one of {', '.join(METRICS)}")
        return self._native.metric(METRICS.index(name), window)

    def stats(self) -> dict:
        """Counters and rates: accesses, hits, misses, hit_rate, demand_fetches, prefetches,
        prefetch_accuracy, evictions, releases, cpu_share, overflow, bytes_fetched, capacities,
        cost_model (current estimates), cost_prediction_error, routing_prediction_accuracy,
        adapt_firings ([{access, rule, value, policy, metric, op, threshold}]: the rule of the policy in
        force when it fired), simulated_us."""
        s = self._native.stats()
        s["policy"] = self.policy.name
        for f in s["adapt_firings"]:
            # A firing at clock c happened under the last policy swapped in before c (a firing needs an access).
            policy = next((p for start, p in reversed(self._policies) if start < f["access"]), self._policies[0][1])
            rule = policy.adapt[f["rule"]]
            f["policy"] = policy.name
            f["metric"], f["op"], f["threshold"] = rule.metric, rule.op, rule.threshold
        return s

    def reset(self) -> None:
        """Empty cache, zero counters, cost model back to its starting numbers."""
        self._native.reset()
        self._policies = [(0, self.policy)]

    def replay(self, expert_ids, gate_weights, step_starts, *, oracle_predictions: bool = True,
               predictions: tuple | None = None, host: HostConfig | None = None) -> dict:
        """Run a whole trace (``expert_ids`` int32 ``[tokens, layers, k]``, ``gate_weights`` float32
        or None, ``step_starts`` int64 ``[steps + 1]``) through this engine natively; returns stats.

        ``predictions`` = (ids int32, scores float32), both ``[steps, layers, depth, width]``: what
        a predictor said at each step and layer about layers l+1..l+depth (-1 = no id); lookahead and
        learned prefetch are fed these instead of the trace's true routing.
        ``host`` with a capacity: a host tier of that many experts sits behind the GPU tier (as the
        runtime's host pool does: every copied, prefetched or CPU-run expert is looked up in it); its
        ``capacity, accesses, hits, misses, hit_rate, disk_bytes`` come back under ``"host"``.
        """
        pred_ids, pred_scores = predictions if predictions is not None else (None, None)
        tier = {}
        if host is not None and host.capacity != AUTO:
            tier = dict(host_capacity=host.capacity, host_eviction=eviction_code(host.eviction),
                        host_high_watermark=host.high_watermark, host_low_watermark=host.low_watermark)
        native = self._native.replay(expert_ids, gate_weights, step_starts, oracle_predictions, pred_ids,
                                     pred_scores, **tier)
        out = self.stats()
        if "host" in native:
            out["host"] = dict(native["host"])
        return out
