"""Typed surface of the native extension moerun._C: the whole boundary, declared in one place.

Import these names from moerun.native (tests/native/test_boundary.py holds this file equal to what the
extension exports). ``Written[torch.Tensor]`` marks a tensor the native call writes into (in place,
possibly after the call returns, on a stream or a host thread); every other tensor argument is only read.
"""
from typing import Annotated, Sequence, TypeVar

import torch

_T = TypeVar("_T")
Written = Annotated[_T, "written in place by the native call"]

def build_info() -> dict: ...
def physical_cores() -> int: ...

# -- the slot layout (csrc/slot_layout.h) ---------------------------------------------------------------
class SlotLayout:
    """Where one expert's tensors sit in its slot; offsets and sizes in bytes."""
    dtype: torch.dtype
    hidden_size: int
    inter_size: int
    gate_up_offset: int         # gate_up [2I, H]: gate rows, then up rows
    gate_up_bytes: int
    gate_up_scales_offset: int
    gate_up_scales_bytes: int   # 0: float formats have no scales
    down_offset: int            # down [H, I]
    down_bytes: int
    down_scales_offset: int
    down_scales_bytes: int
    gate_up_zeros_offset: int
    gate_up_zeros_bytes: int    # int4 zero points (uint8); else 0
    down_zeros_offset: int
    down_zeros_bytes: int
    has_bias: bool              # the slot holds the expert's biases (slot_layout(..., bias=True))
    gate_up_bias_offset: int
    gate_up_bias_bytes: int     # [2I] of dtype: gate biases, then up biases; 0 without biases
    down_bias_offset: int
    down_bias_bytes: int        # [H] of dtype; 0 without biases
    slot_elems: int             # elements of dtype in one slot, padding included
    slot_bytes: int
    format: str                 # one of expert_formats()' names
    group_size: int             # inputs per scale group (fp8-block128: the block edge); 0 per-channel / float
    quantized: bool
    kind: int                   # the decode kernels run: an index of format_kinds()
    weight_bits: int            # bits of one stored weight, scales not counted

def slot_layout(dtype: torch.dtype, hidden_size: int, inter_size: int, format: str = "float",
                bias: bool = False) -> SlotLayout: ...
def expert_formats() -> list[tuple[str, str]]: ...  # (name, description), the one list (csrc/expert_format.h)
def format_kinds() -> list[str]: ...  # the formats' kinds in code order (SlotLayout.kind indexes it)
def expert_activations() -> list[str]: ...  # the expert activations in code order (csrc/expert_activation.h)
def slot_elems(hidden_size: int, inter_size: int) -> int: ...  # slot_layout(...).slot_elems

# -- the expert codec (csrc/expert_codec.*): an expert <-> its slot's bytes in any format -------------------
def encode_expert(layout: SlotLayout, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  out: Written[torch.Tensor] | None = None, gate_up_bias: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None) -> torch.Tensor: ...  # uint8 [slot_bytes] (out's bytes when given)
def decode_expert(layout: SlotLayout, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...  # fp32 [2I, H], [H, I]

class ExpertArena:
    def __init__(self, num_slots: int, slot_elems: int, dtype: torch.dtype, device: torch.device | str | int,
                 num_layers: int, num_experts: int) -> None: ...
    @property
    def weights(self) -> Written[torch.Tensor]: ...     # [num_slots, slot_elems] model dtype on device; TransferEngine.fetch writes slots
    @property
    def slot_table(self) -> Written[torch.Tensor]: ...  # [num_layers, num_experts] int32 on device; -1 = not resident
    def assign(self, slot: int, layer: int, expert: int) -> None: ...
    def evict(self, slot: int) -> None: ...
    def clear(self) -> None: ...
    def lookup(self, layer: int, expert: int) -> int: ...
    def occupant(self, slot: int) -> tuple[int, int]: ...
    resident_count: int
    num_slots: int
    slot_elems: int
    slot_bytes: int
    num_layers: int
    num_experts: int
    dtype: torch.dtype
    device: torch.device

class HostPool:
    def __init__(self, num_layers: int, num_experts: int, hidden_size: int, inter_size: int, dtype: torch.dtype,
                 chunk_bytes: int = 1 << 30, pinned: bool = True, capacity: int = 0, eviction: int = 0,
                 high_watermark: float = 0.9, low_watermark: float = 0.7, credit_decay: float = 0.95,
                 wait_timeout_s: float = 60.0, format: str = "float", bias: bool = False) -> None: ...
    # sources: (layer, expert, [(file, tensor), ...]): the tensors `encoding` names, in its order
    # ("float", "fp8-block128", "gptq", "gptq-v2": gate's, up's, down's; "gpt-oss-mxfp4", "gpt-oss-float": the
    # layer's stacked tensors, the expert picking its slice; csrc/expert_files.h)
    def fill(self, sources: Sequence[tuple[int, int, Sequence[tuple[str, str]]]],
             num_threads: int = 0, encoding: str = "float") -> None: ...
    def write_expert(self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None: ...
    def view(self, layer: int, expert: int) -> Written[torch.Tensor]: ...  # [slot_elems], aliases pool memory
    def acquire(self, layer: int, expert: int) -> Written[torch.Tensor]: ...  # held view; a cache reads a miss from disk
    def release(self, layer: int, expert: int) -> None: ...
    def prefetch(self, layer: int, expert: int) -> None: ...
    def host_slot(self, layer: int, expert: int) -> int: ...  # -1 = not in host memory
    def filled(self, layer: int, expert: int) -> bool: ...
    def stats(self) -> dict[str, float]: ...
    def reset_stats(self) -> None: ...
    cached: bool  # capacity below the model's experts: a cache in front of the files
    capacity: int
    filled_count: int
    layout: SlotLayout          # the format, dtype and offsets of every slot
    num_layers: int
    num_experts: int
    hidden_size: int
    inter_size: int
    slot_elems: int
    slot_bytes: int
    total_bytes: int
    num_chunks: int
    pinned: bool
    dtype: torch.dtype

class TransferEngine:
    def __init__(self, arena: ExpertArena, pool: HostPool, num_streams: int = 2,
                 max_inflight_prefetches: int = 2) -> None: ...
    def fetch(self, layer: int, expert: int, slot: int, demand: bool = True) -> None: ...  # writes arena.weights[slot] and the slot table
    # One layer step as its plan lists it: demand copies + waits on the slots read, then (after the kernel
    # launch) releases, prefetches, released experts; each call writes the slot table once.
    def begin_step(self, layer: int, plan: Plan) -> None: ...  # writes arena.weights and the slot table
    def end_step(self) -> None: ...
    def prefetch(self, plan: Plan) -> None: ...  # queues plan.prefetches (PolicyEngine.prefetch_ahead's plan)
    step_open: bool
    settled: bool  # nothing handed over since synchronize(): every expert in the table has landed
    def take_copy_timing(self) -> tuple[float, int]: ...  # (copy_time_us, timed_bytes) since the last call
    def wait_slots(self, slots: Sequence[int]) -> None: ...
    def release_slots(self, slots: Sequence[int]) -> None: ...
    def cancel_prefetches(self) -> list[tuple[int, int, int]]: ...
    def poll(self) -> None: ...
    def synchronize(self) -> None: ...
    def stats(self) -> dict[str, float]: ...
    def reset_stats(self) -> None: ...
    queued_prefetches: int
    num_streams: int

class CpuExecutor:
    def __init__(self, num_threads: int = 0) -> None: ...
    def submit(self, pool: HostPool, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               experts: Sequence[int], out: Written[torch.Tensor],
               activation: object | None = None) -> None: ...  # out [T, H] fp32, complete after wait(); activation: an ExpertActivation
    def wait(self) -> None: ...
    busy: bool
    last_job_us: float  # the executor's own time of the last job
    isa: str  # scalar | avx2 | avx512 | avx512_bf16 | amx_bf16 (chosen at run time)
    num_threads: int

# -- the policy engine (csrc/policy_engine.h; moerun/policy_engine.py wraps it) -------------------------------
# -- the CPU device's fused MoE (csrc/fused_moe_host*): kernels/fused_moe.fused_moe's twin over a host arena --
def fused_moe_host(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_table: torch.Tensor,
                   arena: torch.Tensor, layout: SlotLayout,
                   out: Written[torch.Tensor] | None = None,
                   activation: object | None = None) -> torch.Tensor: ...  # [T, H] x.dtype; pairs not resident add 0


def policy_vocabulary() -> dict[str, list[str]]: ...  # each enum's names in order, and the config's keys

class Plan:
    """Decisions of one layer step; the engine reuses the object for its next step."""
    @property
    def hits(self) -> list[tuple[int, int]]: ...                      # (expert, slot)
    @property
    def fetches(self) -> list[tuple[int, int, int, int]]: ...         # (expert, slot, victim_layer, victim_expert)
    @property
    def cpu(self) -> list[tuple[int]]: ...                            # (expert,)
    @property
    def prefetches(self) -> list[tuple[int, int, int, int, int]]: ... # (layer, expert, slot, victim_layer, victim_expert)
    @property
    def releases(self) -> list[tuple[int, int, int]]: ...             # (slot, layer, expert)
    @property
    def cpu_experts(self) -> list[int]: ...                           # cpu's experts, as CpuExecutor.submit takes them
    @property
    def counts(self) -> tuple[int, int, int, int, int, int, int]: ...  # (hits, fetches, fetch_evictions, cpu, cpu_pairs, prefetches, prefetch_evictions)
    cpu_pairs: int  # routed (token, expert) pairs of the CPU experts
    num_hits: int
    num_fetches: int
    num_cpu: int
    num_prefetches: int
    num_releases: int
    predicted_us: float
    stream_ahead: bool  # the prefetches are a prefill's next-layer stream: issued at once after the kernel

class PolicyEngine:
    def __init__(self, config: dict) -> None: ...  # every key of policy_vocabulary()["config_keys"], nothing else
    def step(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float] | None,
             prefill: bool = False) -> Plan: ...
    def observe_prediction(self, layer: int, expert_ids: Sequence[int], scores: Sequence[float] | None = None) -> None: ...
    def prefetch_ahead(self, layer: int, expert_ids: Sequence[int], scores: Sequence[float] | None = None) -> Plan: ...
    def observe_timing(self, layer: int, layer_us: float, copy_us: float, copy_bytes: int, cpu_us: float,
                       cpu_expert_tokens: int, cpu_experts: int = 0) -> None: ...
    def set_config(self, config: dict) -> None: ...
    def reset(self) -> None: ...
    def warm(self, layer: int, expert: int) -> int: ...
    def lookup(self, layer: int, expert: int) -> int: ...
    def metric(self, metric: int, window: int) -> float: ...
    def keep_access_log(self, window: int) -> None: ...
    def stats(self) -> dict: ...
    def replay(self, ids, weights, step_starts, oracle_predictions: bool = True, predicted_ids=None,
               predicted_scores=None, host_capacity: int = 0, host_eviction: int = 0,
               host_high_watermark: float = 0.9, host_low_watermark: float = 0.7,
               prefill_steps=None) -> dict: ...  # prefill_steps: uint8 [steps], the steps run as a prefill's
