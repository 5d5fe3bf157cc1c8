"""The policy IR: :class:`CompiledPolicy`, the typed, validated policy, and the language's vocabularies.

``moerun.policy.compiler`` produces a :class:`CompiledPolicy` from a validated syntax tree. This
module knows nothing about syntax or source positions, and nothing about torch;
``moerun.policy.engine_setup`` turns a ``CompiledPolicy`` into the native engine's config. The name
lists below are the language's one definition of each vocabulary (the schema, validator, engine
setup and docs read them from here); the native engine's enums list the same names in the same
order (csrc/policy_engine.h), and a test holds the two equal.

Units: capacities count expert slots; windows and TTLs count accesses of the cache concerned
(one access = one (layer, expert) lookup); times are milliseconds; sizes are GiB where the
language says ``_gb``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

# -- vocabularies (defined once) ------------------------------------------------------------------
EVICTIONS = ("lru", "lfu", "score", "freq_threshold", "watermark")
# Needs the future of the trace, so only offline replay can run it (upper bound for sweeps).
REPLAY_ONLY_EVICTIONS = ("belady",)
PREFETCH_STRATEGIES = ("none", "history", "affinity", "lookahead", "learned")
SCHEDULE_MODES = ("gpu_only", "cpu_fallback", "hybrid")
ALLOCATIONS = ("uniform", "entropy")
# Metrics an adapt rule or monitor block may name; all are computed by the engine over windows.
METRICS = (
    "hit_rate",            # fraction of expert accesses served from a GPU slot
    "miss_rate",           # 1 - hit_rate
    "eviction_rate",       # evictions per access
    "prefetch_accuracy",   # prefetched experts used before eviction / prefetches issued
    "cpu_share",           # fraction of accesses computed on the CPU
    "transfer_gbps",       # host->GPU expert bytes per second of wall time
    "fetches_per_token",   # demand + prefetch copies per token
    "layer_latency_ms",    # mean time of one MoE layer step
    "drift",               # total variation distance of the window's routing from the first window's
    "utilization_gini",    # Gini coefficient of the window's access counts over every expert
    "cost_per_token",      # cost model's MoE-layer time per token, in µs
)
ADAPT_OPS = ("<", "<=", ">", ">=", "==", "!=")
# Actions an adapt rule may take besides assignments: `trigger X`, `rebalance X`.
ADAPT_TRIGGERS = ("evict_ttl", "evict_memory", "reset_stats")
ADAPT_REBALANCES = ("per_layer",)
# Parameters the engine can change at run time (an adapt rule's assignments), in the order of the
# native Param enum; the schema marks which of them a policy may adapt.
ENGINE_PARAMS = (
    "cache.capacity", "cache.eviction", "cache.frequency_decay", "cache.freq_threshold", "cache.freq_window",
    "cache.score_ema_alpha", "cache.ttl", "cache.high_watermark", "cache.low_watermark", "cache.credit_decay",
    "cache.memory_budget_gb", "cache.memory_threshold", "cache.memory_headroom", "prefetch.strategy",
    "prefetch.budget", "prefetch.lookahead", "prefetch.affinity_threshold", "schedule.mode",
    "schedule.offload_threshold_ms", "schedule.priority_routing",
)

AUTO = 0
"""``capacity = auto``: as many slots as the VRAM budget allows, resolved at load time."""

Scalar = Union[int, float, str, bool]


@dataclass(frozen=True)
class CacheConfig:
    """GPU expert-slot cache (the ``cache`` block)."""

    capacity: int = AUTO                 # slots in total (flat cache); AUTO = from vram budget
    eviction: str = "lru"                # one of EVICTIONS
    frequency_decay: float = 1.0         # lfu: counts scaled by this per access (1.0 = no decay)
    freq_threshold: float = 2.0          # freq_threshold: uses within freq_window that protect an expert
    freq_window: int = 100               # freq_threshold: window length in accesses
    score_ema_alpha: float = 0.3         # score: EMA factor of the gate weight
    pin: tuple[tuple[int, int], ...] = ()  # (layer, expert) never evicted; layer -1 = every layer
    ttl: int = 0                         # evict an expert unused for ttl accesses; 0 = off
    high_watermark: float = 0.9          # watermark: evict when occupancy exceeds this fraction
    low_watermark: float = 0.7           # watermark: ... down to this fraction
    credit_decay: float = 0.95           # watermark: credits scaled by this per access
    memory_budget_gb: float = 0.0        # memory trigger: 0 = off
    memory_threshold: float = 0.9        # memory trigger fires above threshold * budget
    memory_headroom: float = 0.1         # ... and evicts down to (1 - headroom) * budget
    expert_size_gb: float = 0.0          # 0 = taken from the model at load time
    capacity_factor: float = 0.0         # Switch/GShard token capacity per expert and step; 0 = none (replay only)


@dataclass(frozen=True)
class PrefetchConfig:
    """Experts copied ahead of demand (the ``prefetch`` block)."""

    strategy: str = "none"               # one of PREFETCH_STRATEGIES
    budget: int = 0                      # most prefetches issued per layer step
    lookahead: int = 1                   # how many layers ahead to prefetch
    affinity_threshold: float = 0.1      # affinity: min transition probability L -> L+1
    history_window: int = 64             # history: tokens of co-occurrence kept
    predictor: str = ""                  # learned: predictor file (moerun.expert_predictor); "" = none


@dataclass(frozen=True)
class ScheduleConfig:
    """Where misses run (the ``schedule`` block)."""

    mode: str = "gpu_only"               # one of SCHEDULE_MODES
    offload_threshold_ms: float = 0.0    # hybrid: run on CPU if the copy would take longer; 0 = cost model
    overlap: bool = True                 # overlap copies/CPU work with GPU compute
    priority_routing: bool = True        # demand fetches jump ahead of queued prefetches
    prefill_staging: float = 0.25        # share of the slots a prefill may hold experts the cache does not keep in
    prefill_updates_cache: bool = False  # prefill accesses update the cache's recency/frequency/prefetch state


@dataclass(frozen=True)
class MonitorConfig:
    """What the runtime records and how often it logs (the ``monitor`` block)."""

    metrics: tuple[str, ...] = ("hit_rate",)
    window: int = 100                    # accesses per sliding window
    log_interval: int = 0                # tokens between log lines; 0 = never


@dataclass(frozen=True)
class AdaptRule:
    """``when METRIC OP VALUE [for N accesses] { param = value ... trigger X rebalance Y }``."""

    metric: str                          # one of METRICS
    op: str                              # one of ADAPT_OPS
    threshold: float
    window: int                          # accesses the metric is averaged over
    # ("cache.eviction", "lru"), ("prefetch.budget", 4), ... fully qualified by the compiler
    assignments: tuple[tuple[str, Scalar], ...] = ()
    triggers: tuple[str, ...] = ()       # each one of ADAPT_TRIGGERS
    rebalances: tuple[str, ...] = ()     # each one of ADAPT_REBALANCES


@dataclass(frozen=True)
class PerLayerConfig:
    """One cache partition per MoE layer (the ``per_layer`` block)."""

    allocation: str = "uniform"          # one of ALLOCATIONS
    total_budget: int = AUTO             # slots over all layers; AUTO = cache capacity
    min_capacity: int = 1
    max_capacity: int = 0                # 0 = no limit
    rebalance_interval: int = 0          # accesses between rebalances; 0 = never
    entropy_window: int = 1000           # accesses of routing history the entropy is taken over


@dataclass(frozen=True)
class HostConfig:
    """Second tier: the pinned host pool in front of the safetensors files (the ``host`` block)."""

    capacity: int = AUTO                 # experts held in pinned memory; AUTO = all (no disk tier)
    eviction: str = "lru"                # one of EVICTIONS
    high_watermark: float = 0.9
    low_watermark: float = 0.7


@dataclass(frozen=True)
class CompiledPolicy:
    """One compiled ``policy NAME { ... }``."""

    name: str
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    adapt: tuple[AdaptRule, ...] = ()
    per_layer: PerLayerConfig | None = None
    host: HostConfig | None = None
    source: str = "<string>"             # file the policy came from, for messages
