"""Experts modules for the two offloading baselines: hf-ondemand and fiddler.

Both replace transformers' fused experts module of each MoE layer (same call signature) and keep
every expert's weights in host memory (pinned when the compute device is a GPU). They differ in
what happens on a miss:

- :class:`OnDemandExperts` (the seed package's mechanism): the expert is copied to the GPU with a
  Python ``Tensor.to()`` into an LRU cache of whole experts shared by all layers, then run there.
- :class:`FiddlerExperts` (Fiddler's algorithm): a fixed set of experts, chosen by popularity, lives
  on the GPU; every other expert is computed on the CPU on a host copy of its tokens' activations,
  overlapped with the GPU experts, and only the result goes back.

The expert math mirrors transformers' ``batched_mm`` path (per-pair outputs in the model dtype,
weighted, then summed over the top-k) so greedy tokens match the reference. These modules know
nothing about budgets: the caller sizes the cache or chooses the resident set.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from moerun.bench.counters import ExpertCounters
from moerun.bench.moe_layers import ExpertsSite, expert_forward


class _HostExperts(torch.nn.Module):
    """Shared part: host weights of one MoE layer, the activation, the pair-sum combine, counters."""

    def __init__(self, site: ExpertsSite, device: torch.device, counters: ExpertCounters):
        super().__init__()
        fused = site.module
        self.moe_layer = site.moe_layer
        self.device = torch.device(device)
        self.act_fn = fused.act_fn
        self.inter_size = fused.down_proj.shape[-1]
        self.num_experts = fused.gate_up_proj.shape[0]
        pin = self.device.type == "cuda"
        # Plain attributes, not parameters: model.to(device) must leave them in host memory.
        self.host_gate_up = fused.gate_up_proj.detach().cpu()    # [E, 2I, H]
        self.host_down = fused.down_proj.detach().cpu()          # [E, H, I]
        if pin:
            self.host_gate_up = self.host_gate_up.pin_memory()
            self.host_down = self.host_down.pin_memory()
        expert_elems = self.host_gate_up[0].numel() + self.host_down[0].numel()
        self.expert_bytes = expert_elems * self.host_gate_up.element_size()
        self.counters = counters

    def _route(self, top_k_index: torch.Tensor) -> dict[int, list[int]]:
        """expert -> positions of its pairs in the flattened [T*K] routing (the layer's one host sync)."""
        groups: dict[int, list[int]] = {}
        for pos, expert in enumerate(top_k_index.reshape(-1).tolist()):
            groups.setdefault(expert, []).append(pos)
        self.counters.pairs += top_k_index.numel()
        self.counters.loads += len(groups)
        return groups

    @staticmethod
    def _pairs_buffer(hidden: torch.Tensor, top_k_weights: torch.Tensor, device) -> torch.Tensor:
        num_pairs = top_k_weights.numel()
        dtype = torch.result_type(hidden, top_k_weights)
        return torch.zeros(num_pairs, hidden.shape[-1], dtype=dtype, device=device)  # [T*K, H]

    def _run(self, hidden, flat_weights, pairs, positions, gate_up, down, num_top_k: int) -> None:
        """Writes weight * expert(hidden[token]) into ``pairs`` at ``positions`` (all on one device)."""
        rows = positions // num_top_k                                          # [N] token of each pair
        out = expert_forward(hidden[rows], gate_up, down, self.act_fn, self.inter_size)  # [N, H]
        pairs[positions] = (out * flat_weights[positions, None]).to(pairs.dtype)

    @staticmethod
    def _combine(pairs: torch.Tensor, hidden: torch.Tensor, num_top_k: int) -> torch.Tensor:
        return pairs.view(hidden.shape[0], num_top_k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]


class GpuExpertLRU:
    """Whole experts on the GPU, keyed by (moe_layer, expert), least recently used evicted first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the GPU expert cache needs at least 1 slot, got {capacity}")
        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, key: tuple[int, int]):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple[int, int], entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        while len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        self.entries[key] = entry


class OnDemandExperts(_HostExperts):
    """hf-ondemand: each routed expert not in the shared LRU is copied to the GPU with ``.to()``."""

    def __init__(self, site: ExpertsSite, device: torch.device, counters: ExpertCounters, cache: GpuExpertLRU):
        super().__init__(site, device, counters)
        self.cache = cache

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K] -> [T, H]
        num_top_k = top_k_index.shape[-1]
        flat_ids = top_k_index.reshape(-1)                                     # [T*K]
        flat_weights = top_k_weights.reshape(-1)                               # [T*K]
        pairs = self._pairs_buffer(hidden_states, top_k_weights, hidden_states.device)
        for expert, positions in self._route(top_k_index).items():
            entry = self.cache.get((self.moe_layer, expert))
            if entry is None:
                # copy=True: a real copy even when the "GPU" is the CPU (CPU-only runs).
                entry = (self.host_gate_up[expert].to(self.device, non_blocking=True, copy=True),
                         self.host_down[expert].to(self.device, non_blocking=True, copy=True))
                self.cache.put((self.moe_layer, expert), entry)
                self.counters.copied_bytes += self.expert_bytes
            else:
                self.counters.gpu_hits += 1
            where = (flat_ids == expert).nonzero().squeeze(1)                 # [N] on the device, no sync
            self._run(hidden_states, flat_weights, pairs, where, entry[0], entry[1], num_top_k)
        return self._combine(pairs, hidden_states, num_top_k)


class FiddlerExperts(_HostExperts):
    """fiddler: resident experts run on the GPU; every other routed expert runs on the CPU."""

    def __init__(self, site: ExpertsSite, device: torch.device, counters: ExpertCounters):
        super().__init__(site, device, counters)
        self.resident: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.popularity = torch.zeros(self.num_experts, dtype=torch.long)   # accesses seen per expert

    def place(self, experts: list[int]) -> None:
        """Make exactly ``experts`` resident on the GPU (copied once, at placement)."""
        self.resident = {
            e: (self.host_gate_up[e].to(self.device, copy=True), self.host_down[e].to(self.device, copy=True))
            for e in sorted(experts)
        }

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, K], [T, K] -> [T, H]
        num_top_k = top_k_index.shape[-1]
        groups = self._route(top_k_index)
        for expert, positions in groups.items():
            self.popularity[expert] += len(positions)
        on_cpu = {e: p for e, p in groups.items() if e not in self.resident}
        flat_ids = top_k_index.reshape(-1)                                     # [T*K]
        flat_weights = top_k_weights.reshape(-1)                               # [T*K]
        pairs = self._pairs_buffer(hidden_states, top_k_weights, hidden_states.device)
        if on_cpu:
            # Host copies of what the CPU experts need; taken before the GPU work is queued.
            hidden_host = hidden_states.to("cpu", copy=True)                   # [T, H]
            weights_host = flat_weights.to("cpu", copy=True)                   # [T*K]
        # GPU experts are queued first so they run while the host computes the CPU experts.
        for expert, positions in groups.items():
            if expert in self.resident:
                where = (flat_ids == expert).nonzero().squeeze(1)
                self._run(hidden_states, flat_weights, pairs, where, *self.resident[expert], num_top_k)
                self.counters.gpu_hits += 1
        if on_cpu:
            cpu_pairs = self._pairs_buffer(hidden_host, weights_host, "cpu")   # [T*K, H]
            for expert, positions in on_cpu.items():
                where = torch.tensor(positions, dtype=torch.long)
                self._run(hidden_host, weights_host, cpu_pairs, where,
                          self.host_gate_up[expert], self.host_down[expert], num_top_k)
                self.counters.cpu_loads += 1
            cpu_rows = torch.tensor(sorted(p for ps in on_cpu.values() for p in ps), dtype=torch.long)
            pairs[cpu_rows.to(pairs.device)] = cpu_pairs[cpu_rows].to(pairs.device, non_blocking=True)
        return self._combine(pairs, hidden_states, num_top_k)
