"""ExpertCounters: the expert traffic every benchmarked system reports in the same terms.

Decisions are per *load*: one unique expert needed by one MoE layer step (a step's tokens that
share an expert need it once). A load is served by an expert already on the GPU (a *hit*), by
computing it on the CPU, or by copying its weights to the GPU first (moving ``copied_bytes``).
``pairs`` counts the (token, expert) pairs routed; the gap between pairs and loads is what
deduplicating experts across the tokens of a step saves.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ExpertCounters:
    pairs: int = 0             # (token, expert) pairs routed
    loads: int = 0             # unique experts per MoE layer step, summed over steps
    gpu_hits: int = 0          # loads whose expert was already on the GPU
    cpu_loads: int = 0         # loads computed on the CPU
    copied_bytes: int = 0      # weight bytes copied host -> GPU (experts, or whole offloaded modules)

    def __sub__(self, other: "ExpertCounters") -> "ExpertCounters":
        return ExpertCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def __add__(self, other: "ExpertCounters") -> "ExpertCounters":
        return ExpertCounters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def copy(self) -> "ExpertCounters":
        return ExpertCounters(**asdict(self))

    @property
    def hit_rate(self) -> float | None:
        return self.gpu_hits / self.loads if self.loads else None

    @property
    def cpu_share(self) -> float | None:
        return self.cpu_loads / self.loads if self.loads else None
