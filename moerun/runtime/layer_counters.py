"""Per-layer counters of what the runtime did (from the plans it carried out).

The policy engine keeps its own decision statistics (windows, adapt firings, prefetch accuracy);
these counters are the runtime's side: pairs served from slots, by copies, on the CPU, and bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

COUNTER_NAMES = ("steps", "pairs", "hits", "fetches", "prefetches", "evictions", "cpu_experts",
                 "fetch_bytes", "prefetch_bytes")


@dataclass
class LayerCounters:
    """Counts of one MoE layer since the last reset. Hits/fetches/cpu count unique experts per step."""

    steps: int = 0
    pairs: int = 0            # (token, expert) pairs routed
    hits: int = 0             # unique experts found resident
    fetches: int = 0          # unique experts copied on demand
    prefetches: int = 0       # copies issued ahead of demand (for later layers)
    evictions: int = 0        # copies that replaced a resident expert
    cpu_experts: int = 0      # unique experts computed on the CPU
    fetch_bytes: int = 0
    prefetch_bytes: int = 0

    def add_step(self, num_pairs: int, counts: tuple[int, ...], slot_bytes: int) -> None:
        """Count one carried-out plan of ``num_pairs`` routed pairs; ``counts`` is its ``Plan.counts``:
        (hits, fetches, fetch evictions, CPU experts, CPU pairs, prefetches, prefetch evictions)."""
        hits, fetches, fetch_evictions, cpu_experts, _, prefetches, prefetch_evictions = counts
        self.steps += 1
        self.pairs += num_pairs
        self.hits += hits
        self.fetches += fetches
        self.evictions += fetch_evictions + prefetch_evictions
        self.cpu_experts += cpu_experts
        self.fetch_bytes += fetches * slot_bytes
        self.prefetches += prefetches
        self.prefetch_bytes += prefetches * slot_bytes

    def add_prefetches(self, prefetches: int, evictions: int, slot_bytes: int) -> None:
        """Count ``prefetches`` copies issued between steps, ``evictions`` of them into an occupied slot."""
        self.prefetches += prefetches
        self.evictions += evictions
        self.prefetch_bytes += prefetches * slot_bytes

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(counters: dict[int, LayerCounters]) -> dict:
    """Totals and rates over layers, plus the per-layer dicts."""
    total = LayerCounters()
    for c in counters.values():
        for name in COUNTER_NAMES:
            setattr(total, name, getattr(total, name) + getattr(c, name))
    accesses = total.hits + total.fetches + total.cpu_experts
    return {
        **total.as_dict(),
        "misses": total.fetches + total.cpu_experts,
        "hit_rate": total.hits / accesses if accesses else 0.0,
        "cpu_share": total.cpu_experts / accesses if accesses else 0.0,
        "bytes_copied": total.fetch_bytes + total.prefetch_bytes,
        "per_layer": {layer: c.as_dict() for layer, c in counters.items()},
    }
