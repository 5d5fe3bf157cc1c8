"""ExpertCounters: the expert traffic every benchmarked system reports in the same terms.

One *access* is one (token, routed expert) pair of one MoE layer. A system serves an access from
a GPU-resident expert (a *hit*), computes it on the CPU, or copies the expert's weights to the GPU
first (a miss that moves ``copied_bytes``). ``expert_loads`` counts the (layer step, unique expert)
pairs, where the system knows them: the gap between accesses and loads is what deduplicating
experts across the tokens of a step saves.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ExpertCounters:
    accesses: int = 0          # (token, expert) pairs routed
    gpu_hits: int = 0          # ... whose expert was already on the GPU
    cpu_accesses: int = 0      # ... computed on the CPU
    copied_bytes: int = 0      # weight bytes copied host -> GPU (experts, or whole offloaded modules)
    expert_loads: int = 0      # unique experts per layer step, summed; 0 when the system does not know

    def __sub__(self, other: "ExpertCounters") -> "ExpertCounters":
        return ExpertCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def copy(self) -> "ExpertCounters":
        return ExpertCounters(**asdict(self))

    @property
    def hit_rate(self) -> float | None:
        return self.gpu_hits / self.accesses if self.accesses else None

    @property
    def cpu_share(self) -> float | None:
        return self.cpu_accesses / self.accesses if self.accesses else None
