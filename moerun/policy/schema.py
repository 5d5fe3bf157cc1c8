"""What each block of a policy may contain: key, type, range, vocabulary, adaptability.

One table drives the validator (types, ranges, "did you mean"), the compiler (which config field a
key fills) and ``moerun policy explain``. Vocabularies come from :mod:`moerun.policy.ir`.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ir


@dataclass(frozen=True)
class Param:
    """One ``key = value`` a block accepts.

    ``kind``: ``int``, ``float``, ``enum``, ``bool``, ``metrics`` (list of metric names), ``pin``
    (list of ``EXPERT`` or ``LAYER:EXPERT``) or ``path`` (a double-quoted file path). Bounds are inclusive unless ``*_open``.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    auto: bool = False          # accepts `auto` (ir.AUTO)
    adaptable: bool = False     # an adapt rule may set it at run time
    inert: bool = False         # accepted for compatibility with MoE-PolicyLang files; moerun does not act on it
    doc: str = ""

    def describe_range(self) -> str:
        """``in (0, 1]``, ``>= 1``, ... for messages."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "any number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_FRACTION = dict(lo=0.0, hi=1.0, lo_open=True)          # (0, 1]
_EVICTION_CHOICES = ir.EVICTIONS + ir.REPLAY_ONLY_EVICTIONS

BLOCKS: dict[str, dict[str, Param]] = {
    "cache": {
        "capacity": Param("int", lo=1, auto=True, adaptable=True, doc="GPU expert slots kept resident"),
        "eviction": Param("enum", choices=_EVICTION_CHOICES, adaptable=True, doc="which expert leaves a full cache"),
        "frequency_decay": Param("float", **_FRACTION, adaptable=True, doc="lfu: count decay per access"),
        "freq_threshold": Param("float", lo=0.0, lo_open=True, adaptable=True,
                                doc="freq_threshold: uses in the window that protect an expert"),
        "freq_window": Param("int", lo=1, adaptable=True, doc="freq_threshold: window in accesses"),
        "score_ema_alpha": Param("float", **_FRACTION, adaptable=True, doc="score: EMA factor of gate weights"),
        "pin": Param("pin", doc="experts never evicted"),
        "ttl": Param("int", lo=0, adaptable=True, doc="evict experts unused this many accesses (0 = off)"),
        "high_watermark": Param("float", **_FRACTION, doc="watermark: evict above this occupancy"),
        "low_watermark": Param("float", **_FRACTION, doc="watermark: evict down to this occupancy"),
        "credit_decay": Param("float", **_FRACTION, doc="watermark: credit decay per access"),
        "memory_budget_gb": Param("float", lo=0.0, doc="memory trigger budget (0 = off)"),
        "memory_threshold": Param("float", **_FRACTION, doc="memory trigger fires above this share of the budget"),
        "memory_headroom": Param("float", lo=0.0, hi=1.0, hi_open=True,
                                 doc="memory trigger frees down to 1 - headroom"),
        "expert_size_gb": Param("float", lo=0.0, doc="size of one expert (0 = from the model)"),
        "capacity_factor": Param("float", lo=0.0, lo_open=True,
                                 doc="an expert takes at most capacity_factor x pairs / experts of a step's routed "
                                     "pairs, the rest are dropped (Switch/GShard); replay only"),
    },
    "prefetch": {
        "strategy": Param("enum", choices=ir.PREFETCH_STRATEGIES, adaptable=True, doc="how experts are predicted"),
        "budget": Param("int", lo=0, adaptable=True, doc="most prefetches per layer step"),
        "lookahead": Param("int", lo=1, adaptable=True,
                           doc="layers ahead to prefetch (history, learned; the lookahead strategy predicts the next MoE layer)"),
        "affinity_threshold": Param("float", lo=0.0, hi=1.0, adaptable=True,
                                    doc="affinity: least transition probability"),
        "history_window": Param("int", lo=1, doc="history: tokens of co-occurrence kept"),
        "predictor": Param("path", doc="learned: the expert-predictor file (.npz, relative to the policy file)"),
    },
    "schedule": {
        "mode": Param("enum", choices=ir.SCHEDULE_MODES, adaptable=True, doc="where a miss runs"),
        "offload_threshold_ms": Param("float", lo=0.0, adaptable=True,
                                      doc="hybrid: CPU when the copy would take longer (0 = cost model)"),
        "overlap": Param("bool", inert=True,
                         doc="accepted for compatibility: copies and CPU experts always overlap GPU compute"),
        "priority_routing": Param("bool", doc="demand fetches overtake queued prefetches"),
        "prefill_staging": Param("float", lo=0.0, hi=1.0,
                                 doc="share of the GPU slots a prefill may hold experts in that the cache does not "
                                     "keep (free slots first, then slots the cache's victims lend; 0 = none)"),
        "prefill_updates_cache": Param("bool", doc="prefill accesses update the cache's recency, frequencies and "
                                                   "prefetch tables (false: the cache decoding finds is decode's)"),
    },
    "monitor": {
        "metrics": Param("metrics", inert=True,
                         doc="accepted for compatibility: the engine computes every metric (stats(), adapt rules)"),
        "window": Param("int", lo=1, doc="default window, in accesses, of adapt rules without `for N accesses`"),
        "log_interval": Param("int", lo=0, inert=True, doc="accepted for compatibility: moerun writes no log lines"),
    },
    "per_layer": {
        "allocation": Param("enum", choices=ir.ALLOCATIONS, doc="how slots are split between layers"),
        "total_budget": Param("int", lo=1, auto=True, doc="slots over all layers"),
        "min_capacity": Param("int", lo=1, doc="fewest slots a layer gets"),
        "max_capacity": Param("int", lo=1, doc="most slots a layer gets"),
        "rebalance_interval": Param("int", lo=0, doc="accesses between rebalances (0 = never)"),
        "entropy_window": Param("int", lo=1, doc="accesses of routing history for entropy"),
    },
    "host": {
        "capacity": Param("int", lo=1, auto=True, doc="experts held in pinned host memory"),
        "eviction": Param("enum", choices=ir.EVICTIONS, doc="which expert leaves a full host pool"),
        "high_watermark": Param("float", **_FRACTION, doc="evict above this occupancy"),
        "low_watermark": Param("float", **_FRACTION, doc="evict down to this occupancy"),
    },
}

ADAPT_BLOCK = "adapt"
SECTION_NAMES = tuple(BLOCKS) + (ADAPT_BLOCK,)

# Names MoE-PolicyLang's adapt rules use for qualified parameters.
ADAPT_ALIASES = {
    "prefetch_strategy": "prefetch.strategy",
    "prefetch_budget": "prefetch.budget",
    "schedule_mode": "schedule.mode",
    "lfu_decay": "cache.frequency_decay",
}
# MoE-PolicyLang's action targets: `trigger memory_pressure`, `rebalance entropy` (its runtime
# rebalances the per-layer budget whatever the word).
TRIGGER_ALIASES = {"memory_pressure": "evict_memory"}
REBALANCE_ALIASES = {"entropy": "per_layer", "uniform": "per_layer"}
# MoE-PolicyLang's monitor metric `latency` is the per-layer step time.
METRIC_ALIASES = {"latency": "layer_latency_ms"}


def resolve_metric(name: str) -> str:
    """The ir.METRICS name for ``name`` (which may be an alias)."""
    return METRIC_ALIASES.get(name, name)

ADAPTABLE: dict[str, Param] = {
    f"{block}.{key}": p for block, params in BLOCKS.items() for key, p in params.items() if p.adaptable
}


def resolve_adapt_key(key: str) -> str | None:
    """The fully qualified name an adapt assignment sets, or None when the key names no parameter.

    Accepts ``block.key``, MoE-PolicyLang's aliases, and a bare key that only one block has.
    The result may name a parameter that is not adaptable; the validator reports that.
    """
    if key in ADAPT_ALIASES:
        return ADAPT_ALIASES[key]
    if "." in key:
        block, _, name = key.partition(".")
        return key if name in BLOCKS.get(block, {}) else None
    owners = [b for b, params in BLOCKS.items() if key in params]
    adaptable = [b for b in owners if BLOCKS[b][key].adaptable]
    if len(adaptable) == 1:
        return f"{adaptable[0]}.{key}"
    return f"{owners[0]}.{key}" if owners else None
