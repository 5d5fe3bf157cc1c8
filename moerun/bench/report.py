"""Presenting bench results: the table on stdout, the JSON file and the tok/s-vs-budget plot.

A :class:`SystemResult` is one row: one system under one budget, either measured or with the
reason it did not run. This module does no measuring.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moerun.bench.budget import format_bytes
from moerun.bench.counters import ExpertCounters
from moerun.bench.limits import DecodeLimit
from moerun.bench.measure import Measurement, PrefillPoint, Spread


@dataclass
class SystemResult:
    """One system under one budget."""

    system: str                       # "hf-auto", "moerun:balanced", ...
    budget: str                       # as written ("10GiB", "50%"); "-" for budget-free systems
    budget_bytes: int | None
    status: str = "ok"                # "ok", "skipped: ...", "failed: ..."
    notes: str = ""
    load_s: float | None = None
    measurement: Measurement | None = None
    match: tuple[int, int] | None = None   # (matching tokens, compared) against the reference
    expert_bytes: int = 0
    expert_format: str | None = None  # moerun: the arena's format; baselines: the checkpoint's
    slot_bytes: int | None = None     # moerun: bytes of one expert slot
    num_slots: int | None = None      # moerun: expert slots at the budget
    limit: DecodeLimit | None = None  # moerun: the uniform-routing decode bound (moerun.bench.limits)
    prefill: list[PrefillPoint] = field(default_factory=list)  # TTFT per prompt length (--prompt-len L1 L2 ...)

    @property
    def over_budget(self) -> bool:
        m = self.measurement
        return bool(m and m.gpu_peak_bytes is not None and self.budget_bytes and m.gpu_peak_bytes > self.budget_bytes)

    def summary(self) -> dict:
        """Flat numbers for JSON (None where not measured)."""
        m = self.measurement
        out = {
            "system": self.system, "budget": self.budget, "budget_bytes": self.budget_bytes,
            "status": self.status, "notes": self.notes, "load_s": self.load_s,
            "expert_format": self.expert_format, "slot_bytes": self.slot_bytes, "num_slots": self.num_slots,
            "limit": self.limit.summary() if self.limit else None,
            "prefill_lengths": [self._prefill_point(p) for p in self.prefill],
        }
        if m is None:
            return out
        out.update(
            decode_tok_s=_spread(m.decode_tok_s), prefill_tok_s=_spread(m.prefill_tok_s), ttft_ms=_spread(m.ttft_ms),
            decode=self._phase(m.decode_counters), prefill=self._phase(m.prefill_counters),
            gpu_peak_bytes=m.gpu_peak_bytes, over_budget=self.over_budget, repeats=m.repeats_run,
            token_match=list(self.match) if self.match else None,
        )
        return out


    def _prefill_point(self, p: PrefillPoint) -> dict:
        return dict(prompt_len=p.prompt_len, ttft_ms=_spread(p.ttft_ms), prefill_tok_s=_spread(p.prefill_tok_s),
                    counters=self._phase(p.counters), streaming_bound=p.bound.summary() if p.bound else None,
                    hf_resident_ttft_ms=p.reference_ttft_ms)

    def _phase(self, c: ExpertCounters) -> dict:
        return dict(hit_rate=c.hit_rate, cpu_share=c.cpu_share, copied_bytes=c.copied_bytes,
                    expert_pairs=c.pairs, expert_loads=c.loads,
                    dedup_saved_bytes=(c.pairs - c.loads) * self.expert_bytes)


def _spread(spread: Spread | None) -> dict | None:
    return asdict(spread) if spread else None


def _fmt_spread(spread: Spread | None, digits: int = 1) -> str:
    if spread is None:
        return "-"
    if spread.low == spread.high:
        return f"{spread.median:.{digits}f}"
    return f"{spread.median:.{digits}f} [{spread.low:.{digits}f}-{spread.high:.{digits}f}]"


def _fmt_limit(limit: DecodeLimit | None) -> str:
    if limit is None:
        return "-"

    def rate(tok_s: float) -> str:
        return "unbounded" if math.isinf(tok_s) else f"{tok_s:.1f}"

    if limit.pcie_dram_tok_s is None:
        return rate(limit.pcie_tok_s)
    return f"{rate(limit.pcie_tok_s)} / {rate(limit.pcie_dram_tok_s)}"


def _fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


COLUMNS = ("system", "budget", "format", "slot", "slots", "decode tok/s", "limit tok/s", "prefill tok/s",
           "TTFT ms", "hit rate", "copied", "CPU share", "dedup saved", "GPU peak", "tokens = ref", "notes")
# Columns after TTFT describe the decode steps; the JSON has the prefill's as well.


def table_rows(results: list[SystemResult]) -> list[list[str]]:
    rows = []
    for r in results:
        m = r.measurement
        slot = format_bytes(r.slot_bytes) if r.slot_bytes else "-"
        head = [r.system, r.budget, r.expert_format or "-", slot, "-" if r.num_slots is None else str(r.num_slots)]
        if m is None:
            rows.append(head + ["-"] * (len(COLUMNS) - len(head) - 1) + [r.status])
            continue
        c = m.decode_counters
        peak = format_bytes(m.gpu_peak_bytes) if m.gpu_peak_bytes is not None else "n/a (cpu)"
        if r.over_budget:
            peak += " OVER"
        match = "-" if r.match is None else f"{r.match[0]}/{r.match[1]}"
        rows.append(head + [
            _fmt_spread(m.decode_tok_s), _fmt_limit(r.limit), _fmt_spread(m.prefill_tok_s, 0),
            _fmt_spread(m.ttft_ms, 0), _fmt_share(c.hit_rate), format_bytes(c.copied_bytes),
            _fmt_share(c.cpu_share), format_bytes((c.pairs - c.loads) * r.expert_bytes), peak, match, r.notes,
        ])
    return rows


PREFILL_COLUMNS = ("system", "budget", "format", "prompt", "TTFT ms", "prefill tok/s", "bound ms", "bound tok/s",
                   "of bound", "hf-resident TTFT ms", "copied", "CPU share")


def prefill_rows(results: list[SystemResult]) -> list[list[str]]:
    """One row per system and prompt length (the systems measured at several lengths)."""
    rows = []
    for r in results:
        for p in r.prefill:
            b = p.bound
            bound_ms = "-" if b is None else (f"{b.pcie_ms:.3g}" if b.pcie_cpu_ms is None
                                              else f"{b.pcie_ms:.3g} / {b.pcie_cpu_ms:.3g}")
            bound_tok_s = "-" if b is None or math.isinf(b.pcie_tok_s) else f"{b.pcie_tok_s:.0f}"
            share = "-" if b is None or p.ttft_ms is None or not p.ttft_ms.median else \
                f"{100 * b.pcie_ms / p.ttft_ms.median:.0f}%"
            ref = "-" if p.reference_ttft_ms is None else f"{p.reference_ttft_ms:.1f}"
            rows.append([r.system, r.budget, r.expert_format or "-", str(p.prompt_len), _fmt_spread(p.ttft_ms),
                         _fmt_spread(p.prefill_tok_s, 0), bound_ms, bound_tok_s, share, ref,
                         format_bytes(p.counters.copied_bytes), _fmt_share(p.counters.cpu_share)])
    return rows


PREFILL_LEGEND = (
    "prompt: tokens per sequence; TTFT ms and prefill tok/s: median [min-max] over repeats of a one-token "
    "generation (the first length's from the main run); bound ms: what a uniformly routed prompt's non-resident "
    "experts take to move once per MoE layer, E*(1-(1-k/E)^T) experts per layer of which the arena's share is "
    "resident, over the cost model's host-to-device rate / with the CPU executor beside it "
    "(moerun.bench.limits.uniform_prefill_bound; no dense time: a floor); bound tok/s: prompt tokens over the PCIe "
    "bound; of bound: the PCIe bound as a share of the TTFT; copied, CPU share: the prompts' forwards.")


def format_prefill_table(results: list[SystemResult]) -> str | None:
    """The prefill table (TTFT per prompt length beside the streaming bound), or None with no points.
    bound ms: non-resident expert bytes of a uniformly routed prompt over the link / with the CPU share
    (moerun.bench.limits.uniform_prefill_bound); of bound: the PCIe bound's time as a share of the TTFT."""
    rows = prefill_rows(results)
    if not rows:
        return None
    return _format(list(PREFILL_COLUMNS), rows)


def format_table(results: list[SystemResult]) -> str:
    return _format(list(COLUMNS), table_rows(results))


def _format(columns: list[str], body: list[list[str]]) -> str:
    rows = [columns] + body
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) - 1)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 5)
    return "\n".join(lines)


def legend(on_gpu: bool) -> str:
    """What the table's columns mean; a CPU run says what its device is (the arena is host memory there,
    and both moerun's expert kernels and the baselines run on the CPU)."""
    where = "in a GPU slot" if on_gpu else "in an arena slot (host memory on a CPU run)"
    text = (
        "format: the experts' format (moerun: in its host pool and arena; baselines: the checkpoint's); slot: "
        "bytes of one expert slot; slots: expert slots at the budget. "
        "decode tok/s: generated tokens/s after the first (whole batch), median [min-max] over repeats; "
        "limit tok/s: what the bytes allow at batch 1 under uniform routing, every miss copied over PCIe / "
        "misses split between copies and the CPU executor reading host DRAM (moerun.bench.limits: rates from "
        "the policy's cost model, the dense part's step time measured with routed experts skipped; JSON "
        "'limit'); "
        "prefill tok/s and TTFT: prompt tokens/s and time to the first token. Over the decode steps of "
        "the timed repeats (prefill in the JSON): hit rate: experts needed by a layer step (unique per "
        f"step) already {where}; copied: weight bytes copied from the host pool into slots; "
        "CPU share: needed experts computed by the CPU executor (the policy's CPU path); dedup saved: expert "
        "weight bytes that handling each (token, expert) pair on its own would have read on top (tokens of "
        "a step share experts). "
    )
    if on_gpu:
        text += "GPU peak: torch.cuda.max_memory_allocated over load + run (OVER = above the budget); "
    else:
        text += ("On a CPU run every system computes on the same cores, so the numbers show what moerun's "
                 "mechanism costs on a CPU, not offloading; GPU peak is not measured. ")
    return text + ("tokens = ref: generated tokens equal to the reference (greedy prefix per sequence; experts "
                   "quantized at load round differently from the float reference, so their tokens drift from it).")


def write_json(path: Path, header: dict, results: list[SystemResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(header, results=[r.summary() for r in results])
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def plot_budget_sweep(path: Path, results: list[SystemResult], title: str) -> bool:
    """Decode tok/s against budget, one line per system; False when there is nothing to plot."""
    series: dict[str, list[tuple[float, float]]] = {}
    flat: dict[str, float] = {}
    for r in results:
        m = r.measurement
        if m is None or m.decode_tok_s is None:
            continue
        if r.budget_bytes is None:
            flat[r.system] = m.decode_tok_s.median
        else:
            series.setdefault(r.system, []).append((r.budget_bytes, m.decode_tok_s.median))
    if not any(len(points) > 1 for points in series.values()):
        return False
    largest = max(b for points in series.values() for b, _ in points)
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1)) if largest >= s)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] / scale for p in points], [p[1] for p in points], marker="o", label=name)
    for name, value in sorted(flat.items()):
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (ax.get_xlim()[0], value), fontsize=8, va="bottom", color="gray")
    ax.set_xlabel(f"VRAM budget ({unit})")
    ax.set_ylabel("decode tok/s")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
