"""Sweeps: hit rate (and the rest of the replay stats) over policies x capacities, as rows, JSON and
a PNG plot of hit rate vs capacity per policy with Belady, the optimum, drawn on top."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from moerun.files import atomic_write, write_text
from moerun.policy.ir import CacheConfig, CompiledPolicy
from moerun.trace.format import Trace
from moerun.trace.replay import replay

BELADY = CompiledPolicy(name="belady", cache=CacheConfig(eviction="belady"))
BELADY_NOTE = ("belady: the best possible eviction when experts are fetched on demand (it knows the "
               "trace's future); it never prefetches, so a policy that prefetches can hit more often")


def default_capacities(trace: Trace) -> list[int]:
    """Capacities a sweep tries when none are given: 1/8, 1/4 and 1/2 of the trace's experts (all
    layers), each at least top_k, the slots one token's step needs."""
    total = trace.num_layers * trace.num_experts
    return sorted({max(trace.top_k, total // d) for d in (8, 4, 2)})


def sweep(trace: Trace, policies: Sequence[CompiledPolicy], capacities: Sequence[int], *,
          with_belady: bool = True, host_capacity: int | None = None) -> list[dict]:
    """One row per (policy, capacity): policy, capacity, hit_rate, misses, bytes_fetched, cpu_share,
    estimated_ms; with a host tier (``host_capacity``, or a policy's ``host`` block) also host_hit_rate."""
    chosen = list(policies) + ([BELADY] if with_belady and all(p.name != "belady" for p in policies) else [])
    rows = []
    for policy in chosen:
        for cap in capacities:
            p = policy
            if p.per_layer is not None:
                p = replace(p, per_layer=replace(p.per_layer, total_budget=cap))
            s = replay(trace, p, capacity=cap, host_capacity=host_capacity)
            row = dict(policy=policy.name, capacity=cap, hit_rate=s["hit_rate"], misses=s["misses"],
                       bytes_fetched=s["bytes_fetched"], cpu_share=s["cpu_share"], estimated_ms=s["estimated_ms"])
            if "host" in s:
                row["host_hit_rate"] = s["host"]["hit_rate"]
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    host = any("host_hit_rate" in r for r in rows)
    lines = [f"{'policy':<20} {'capacity':>8} {'hit_rate':>8} {'misses':>9} {'GB moved':>9} {'est. ms':>10}"
             + (f" {'host hit':>8}" if host else "")]
    for r in rows:
        lines.append(f"{r['policy']:<20} {r['capacity']:>8} {r['hit_rate']:>8.4f} {r['misses']:>9} "
                     f"{r['bytes_fetched'] / 1e9:>9.2f} {r['estimated_ms']:>10.1f}"
                     + (f" {r.get('host_hit_rate', float('nan')):>8.4f}" if host else ""))
    if any(r["policy"] == BELADY.name for r in rows):
        lines.append(BELADY_NOTE)
    return "\n".join(lines)


def write_outputs(rows: list[dict], json_path: str | Path | None, png_path: str | Path | None,
                  title: str = "") -> None:
    """Write the rows as JSON and/or the hit-rate-vs-capacity plot as PNG (each atomically)."""
    if json_path:
        write_text(json_path, json.dumps(rows, indent=2) + "\n", what="sweep JSON")
    if png_path:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on CI or servers
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(dict.fromkeys(r["policy"] for r in rows))
        names.sort(key=lambda n: n == "belady")  # belady drawn last, on top
        for name in names:
            pts = sorted((r["capacity"], r["hit_rate"]) for r in rows if r["policy"] == name)
            style = dict(color="black", linestyle="--", linewidth=2, zorder=10) if name == "belady" else {}
            ax.plot([c for c, _ in pts], [h for _, h in pts], marker="o", label=name, **style)
        ax.set_xlabel("capacity (expert slots)")
        ax.set_ylabel("hit rate")
        ax.set_title(title or "hit rate vs capacity")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            with atomic_write(png_path, what="sweep plot") as f:
                fig.savefig(f, format="png", dpi=100)
        finally:
            plt.close(fig)
