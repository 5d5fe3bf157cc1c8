"""A compiled policy in plain words, with its numbers (``moerun policy explain``)."""
from __future__ import annotations

from . import ir, schema, syntax

_EVICTION_WORDS = {
    "lru": "the least recently used expert leaves first",
    "lfu": "the least frequently used expert leaves first",
    "score": "the expert with the lowest running gate-weight score leaves first",
    "freq_threshold": "experts used often enough within a window are protected; others leave first",
    "watermark": "eviction starts above the high watermark and frees down to the low one",
    "belady": "the expert used furthest in the future leaves (offline trace replay only)",
}
_SCHEDULE_WORDS = {
    "gpu_only": "every miss is copied to a GPU slot and run there",
    "cpu_fallback": "every miss runs on the CPU from pinned host memory (no copy)",
    "hybrid": "each miss runs wherever it finishes sooner: copy to GPU or compute on CPU",
}


def _slots(n: int, what: str = "GPU expert slots") -> str:
    return f"as many {what} as the VRAM budget allows" if n == ir.AUTO else f"{n} {what}"


def explain(policy: ir.CompiledPolicy) -> str:
    """Several lines describing what ``policy`` will do."""
    c, p, s, m = policy.cache, policy.prefetch, policy.schedule, policy.monitor
    lines = [f"policy {policy.name} ({policy.source}):"]
    if policy.per_layer is None:
        lines.append(f"- cache: keeps {_slots(c.capacity)}, shared by all layers; {_EVICTION_WORDS[c.eviction]}.")
    else:
        pl = policy.per_layer
        total = "the whole cache capacity" if pl.total_budget == ir.AUTO else f"{pl.total_budget} slots"
        limit = f"at most {pl.max_capacity}" if pl.max_capacity else "no maximum"
        lines.append(f"- cache: one partition per layer, splitting {total} ({pl.allocation} allocation, "
                     f"at least {pl.min_capacity} and {limit} per layer); {_EVICTION_WORDS[c.eviction]}.")
        if pl.rebalance_interval:
            lines.append(f"  rebalances every {pl.rebalance_interval} accesses"
                         + (f" from {pl.entropy_window} accesses of routing entropy." if pl.allocation == "entropy"
                            else "."))
    if c.eviction == "lfu" and c.frequency_decay < 1.0:
        lines.append(f"  use counts decay by x{c.frequency_decay} per access.")
    if c.eviction == "freq_threshold":
        lines.append(f"  protected: experts used >= {c.freq_threshold} times in the last {c.freq_window} accesses.")
    if c.eviction == "score":
        lines.append(f"  score = EMA of the gate weight with alpha {c.score_ema_alpha}.")
    if c.eviction == "watermark":
        lines.append(f"  watermarks {c.high_watermark:.0%} -> {c.low_watermark:.0%}, credit decay {c.credit_decay}.")
    if c.pin:
        pins = ", ".join(f"expert {e} in every layer" if layer < 0 else f"layer {layer} expert {e}"
                         for layer, e in c.pin)
        lines.append(f"  never evicted: {pins}.")
    if c.ttl:
        lines.append(f"  an expert unused for {c.ttl} accesses is evicted.")
    if c.memory_budget_gb:
        lines.append(f"  memory trigger: above {c.memory_threshold:.0%} of {c.memory_budget_gb} GB, evict down to "
                     f"{1 - c.memory_headroom:.0%}.")
    if p.strategy == "none":
        lines.append("- prefetch: none; experts are copied only when a token needs them.")
    else:
        lines.append(f"- prefetch: {p.strategy}, up to {p.budget} experts per layer step, {p.lookahead} layer(s) ahead"
                     + (f", transitions with probability >= {p.affinity_threshold}" if p.strategy == "affinity" else "")
                     + (f", co-occurrence over {p.history_window} tokens" if p.strategy == "history" else "")
                     + (f", predictor {p.predictor}" if p.predictor else "") + ".")
    lines.append(f"- misses: {_SCHEDULE_WORDS[s.mode]}"
                 + (f" (CPU when a copy would take over {s.offload_threshold_ms} ms)"
                    if s.mode == "hybrid" and s.offload_threshold_ms else "") + ".")
    lines.append(f"  copies and CPU experts overlap GPU compute; demand fetches "
                 f"{'overtake' if s.priority_routing else 'queue behind'} prefetches.")
    if s.mode == "cpu_fallback":
        staging = "every expert a prompt needs that is not resident runs on the CPU"
    elif s.prefill_staging > 0:
        staging = (f"a prompt's experts the cache has no room for pass through at most {s.prefill_staging:.0%} of "
                   "the slots (free ones, then ones the cache's victims lend until the prompt is done), the next "
                   "layer's streamed while a layer computes; the rest run on the CPU")
    else:
        staging = "a prompt's experts the cache has no room for run on the CPU (no staging slots)"
    lines.append(f"- prefill: {staging}; prompt accesses "
                 f"{'update' if s.prefill_updates_cache else 'leave'} the cache's recency and frequencies"
                 f"{'' if s.prefill_updates_cache else ' as decoding left them'}.")
    if policy.host is not None:
        h = policy.host
        held = ("every expert in pinned memory (no disk tier)" if h.capacity == ir.AUTO else
                f"{h.capacity} experts in pinned memory, the rest read from disk; {_EVICTION_WORDS[h.eviction]}")
        lines.append(f"- host pool: keeps {held}"
                     + f" (watermarks {h.high_watermark:.0%} -> {h.low_watermark:.0%}).")
    lines.append(f"- adapt rules without a window take theirs over {m.window} accesses (monitor.window); "
                 "every metric is counted (model.moerun.stats()); no log lines are written.")
    for rule in policy.adapt:
        actions = [f"set {k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in rule.assignments]
        actions += [f"trigger {t}" for t in rule.triggers] + [f"rebalance {r}" for r in rule.rebalances]
        lines.append(f"- adapt: when {rule.metric} {rule.op} {rule.threshold} over {rule.window} accesses: "
                     f"{'; '.join(actions)}.")
    return "\n".join(lines)


def inert_settings(policy: syntax.Policy) -> list[str]:
    """``file:line:col: note: ...`` for each setting of ``policy`` that moerun accepts (MoE-PolicyLang
    files use it) but does not act on: ``schedule.overlap``, ``monitor.metrics``, ``monitor.log_interval``."""
    notes = []
    for section in policy.sections:
        if not isinstance(section, syntax.Block):
            continue
        for setting in section.settings:
            param = schema.BLOCKS[section.name].get(setting.key)
            if param is not None and param.inert:
                notes.append(f"{setting.span.line}:{setting.span.col}: note: {section.name}.{setting.key} is "
                             f"accepted for compatibility and has no effect ({param.doc.split(': ', 1)[-1]})")
    return notes
