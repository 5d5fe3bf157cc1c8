"""The systems the bench compares, each loaded on the same checkpoint under the same VRAM budget.

``load_system(name, setup, budget_bytes, policy)`` returns a :class:`LoadedSystem`: a model with
``generate`` plus a callable reporting its :class:`ExpertCounters`. The four transformers baselines
are built here; the ``moerun`` row calls ``moerun.load`` with one policy and one expert format. The
baselines run float checkpoints with the model's own routing only; for a checkpoint whose experts are
published packed, or under ``--routing uniform`` (an override of moerun's routing, prefill and decode), they are
skipped with the reason. This module does not time anything (that is ``measure``) and does not print
(that is ``report``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from moerun.bench.budget import format_bytes
from moerun.bench.counters import ExpertCounters
from moerun.bench.models import CheckpointInfo
from moerun.bench.moe_layers import find_experts
from moerun.bench.offloaded_experts import FiddlerExperts, GpuExpertLRU, OnDemandExperts
from moerun.bench.routing_overrides import UniformRouting

# The system names, defined once (CLI choices, table order, JSON keys).
SYSTEMS = ("hf-resident", "hf-auto", "hf-ondemand", "fiddler", "moerun")
# Systems whose tokens are plain transformers math: the reference is the first of these that ran.
REFERENCE_SYSTEMS = ("hf-resident", "hf-auto")
# Systems whose placement does not depend on the budget (run once when --budgets is a list).
BUDGET_FREE_SYSTEMS = ("hf-resident",)


class SystemSkipped(Exception):
    """A system cannot run in this setup (the reason is shown in the table instead of numbers)."""


@dataclass(frozen=True)
class BenchSetup:
    """What every system of one bench run shares."""

    checkpoint: Path
    info: CheckpointInfo
    device: torch.device
    dtype: torch.dtype
    experts_implementation: str    # transformers' experts kernel for the HF baselines ("default": its own choice)
    fixed_bytes: int               # dense weights + KV cache + workspace (moerun's memory plan)
    calibration_ids: torch.Tensor  # fiddler's popularity profile is taken on these prompts [B, S]
    calibration_new_tokens: int
    scratch_dir: Path              # hf-auto's offload folder on CPU-only runs
    max_context: int               # prompt + generated tokens of one sequence
    max_batch: int
    compile_decode: bool = False   # moerun rows: fuse the fast path's kernels (moerun.load(compile_decode=))
    routing: str = "model"         # "model", or "uniform": moerun rows draw experts uniformly (UniformRouting)


@dataclass
class LoadedSystem:
    """One system, loaded and ready to ``generate``."""

    label: str                     # "hf-resident", "moerun:balanced", ...
    model: Any
    notes: str                     # how it runs, in a few words
    counters: Callable[[], ExpertCounters]
    _cleanup: list[Callable[[], None]] = field(default_factory=list)
    expert_format: str | None = None   # moerun rows: the experts' format in the pool and the arena
    slot_bytes: int | None = None      # moerun rows: bytes of one expert slot
    num_slots: int | None = None       # moerun rows: expert slots at the budget

    def close(self) -> None:
        for fn in self._cleanup:
            fn()
        self._cleanup.clear()
        self.model = None


def _from_pretrained(setup: BenchSetup, **kwargs):
    from transformers import AutoModelForCausalLM

    if setup.experts_implementation != "default":
        kwargs["experts_implementation"] = setup.experts_implementation
    return AutoModelForCausalLM.from_pretrained(str(setup.checkpoint), dtype=setup.dtype, **kwargs).eval()


class _RoutingLog:
    """Counts the routing seen by forward pre-hooks on the fused experts modules.

    The hooks only keep the routing tensors; unique experts are counted when the counters are
    read, so no host sync is added while a generation is being timed.
    """

    def __init__(self, model, resident: Callable[[torch.nn.Module], bool]):
        self.counters = ExpertCounters()
        self._pending: list[tuple[torch.Tensor, bool]] = []
        self._resident = resident
        self.handles = [site.module.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for site in find_experts(model)]

    def _hook(self, module, args, kwargs) -> None:
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        self._pending.append((top_k_index.detach(), self._resident(module)))

    def read(self) -> ExpertCounters:
        for top_k_index, resident in self._pending:
            unique = int(top_k_index.unique().numel())
            self.counters.pairs += top_k_index.numel()
            self.counters.loads += unique
            self.counters.gpu_hits += unique if resident else 0
        self._pending.clear()
        return self.counters.copy()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _device_map_arg(device: torch.device) -> int | str:
    """``device`` as transformers' device_map and accelerate's max_memory name it (GPU index or "cpu")."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return device.type


def load_hf_resident(setup: BenchSetup) -> LoadedSystem:
    """The whole model on the device, transformers as is (only when it fits the device at all)."""
    if setup.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(setup.device)
        needed = setup.fixed_bytes + setup.info.routed_bytes
        if needed > free_bytes:
            raise SystemSkipped(f"model needs {format_bytes(needed)}, the GPU has {format_bytes(free_bytes)} free")
    model = _from_pretrained(setup, device_map=_device_map_arg(setup.device))
    log = _RoutingLog(model, resident=lambda m: True)
    return LoadedSystem("hf-resident", model, f"all weights on {setup.device.type}; experts_implementation="
                        f"{setup.experts_implementation}", log.read, [log.remove])


def _called_modules(module: torch.nn.Module):
    """``module``, or for containers that are iterated rather than called, their children."""
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        for child in module.children():
            yield from _called_modules(child)
    else:
        yield module


def load_hf_auto(setup: BenchSetup, budget_bytes: int) -> LoadedSystem:
    """transformers + accelerate ``device_map="auto"``, weights capped at the budget.

    accelerate's ``max_memory`` caps weights only, so it gets the budget minus the KV cache and
    workspace reserve of moerun's plan: the same room for weights as the slot-based systems.
    Offloaded modules are copied to the device for every forward. On a CPU-only machine the CPU
    plays the GPU's role and the disk the host's (accelerate offloads to ``scratch_dir``).
    """
    try:
        import psutil  # installed with accelerate, which device_map="auto" needs
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise SystemSkipped(f"needs accelerate for device_map='auto' ({exc}); pip install accelerate") from exc
    host_bytes = int(psutil.virtual_memory().available * 0.9)
    reserve_bytes = setup.fixed_bytes - setup.info.dense_bytes
    weights_bytes = budget_bytes - reserve_bytes
    if weights_bytes <= 0:
        raise SystemSkipped(f"budget {format_bytes(budget_bytes)} is below the KV cache and workspace "
                            f"reserve of {format_bytes(reserve_bytes)}")
    if setup.device.type == "cuda":
        max_memory = {_device_map_arg(setup.device): weights_bytes, "cpu": host_bytes}
        offload = {}
    else:
        max_memory = {"cpu": weights_bytes}
        offload = {"offload_folder": str(setup.scratch_dir / "hf-auto-offload")}
    model = _from_pretrained(setup, device_map="auto", max_memory=max_memory, **offload)
    compute = setup.device.type
    log = _RoutingLog(model, resident=lambda m: m.gate_up_proj.device.type == compute)
    # Without a GPU the CPU is the compute device, so only "disk" entries are offloaded.
    offloaded_to = ("cpu", "disk") if setup.device.type == "cuda" else ("disk",)
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = [name for name, where in device_map.items() if where in offloaded_to]

    def counting_hook(moved_bytes: int):
        def hook(module, args):
            log.counters.copied_bytes += moved_bytes
        return hook

    # accelerate copies an offloaded module's weights to the device for each of its forwards.
    handles = []
    for name in offloaded:
        for module in _called_modules(model.get_submodule(name)):
            moved = sum(p.numel() * p.element_size() for p in module.parameters())
            handles.append(module.register_forward_pre_hook(counting_hook(moved)))
    placement = f"{len(offloaded)}/{len(device_map)} modules offloaded" if offloaded else "nothing offloaded"
    return LoadedSystem("hf-auto", model, f"accelerate device_map=auto, max_memory={format_bytes(weights_bytes)} "
                        f"(budget - KV/workspace reserve); {placement}", log.read,
                        [log.remove] + [h.remove for h in handles])


def expert_slots(setup: BenchSetup, budget_bytes: int) -> int:
    """Whole experts that fit on the device: the slots of moerun's memory plan for this budget, so
    every slot-based system gets the same room for experts."""
    import moerun
    from moerun.runtime.memory import BudgetError

    try:
        plan = moerun.memory_plan(str(setup.checkpoint), vram_budget=budget_bytes, device=setup.device,
                                  dtype=setup.dtype, max_context=setup.max_context, max_batch=setup.max_batch)
    except BudgetError as exc:
        raise SystemSkipped(str(exc)) from exc
    return plan.num_slots


def _load_dense_on_device(setup: BenchSetup, make_experts) -> tuple[Any, list]:
    """Loads on the host, swaps each fused experts module for ``make_experts(site)``, moves the rest."""
    model = _from_pretrained(setup, device_map="cpu")
    modules = []
    for site in find_experts(model):
        replacement = make_experts(site)
        setattr(site.parent, site.attr, replacement)
        modules.append(replacement)
    model.to(setup.device)
    return model, modules


def load_hf_ondemand(setup: BenchSetup, budget_bytes: int) -> LoadedSystem:
    """Experts in host memory, copied with ``Tensor.to()`` into a GPU LRU of whole experts on demand."""
    capacity = expert_slots(setup, budget_bytes)
    counters = ExpertCounters()
    cache = GpuExpertLRU(capacity)
    model, _ = _load_dense_on_device(setup, lambda site: OnDemandExperts(site, setup.device, counters, cache))
    total = setup.info.num_moe_layers * setup.info.num_experts
    return LoadedSystem("hf-ondemand", model, f"LRU of {capacity}/{total} experts, misses copied with .to()",
                        lambda: counters.copy())


def load_fiddler(setup: BenchSetup, budget_bytes: int) -> LoadedSystem:
    """Fiddler: the most popular experts (profiled on calibration prompts) resident; misses on the CPU."""
    capacity = expert_slots(setup, budget_bytes)
    counters = ExpertCounters()
    model, layers = _load_dense_on_device(setup, lambda site: FiddlerExperts(site, setup.device, counters))
    # Profile: one generation on prompts the benchmark does not time, every expert on the CPU.
    with torch.inference_mode():
        ids = setup.calibration_ids.to(setup.device)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=setup.calibration_new_tokens,
                       min_new_tokens=setup.calibration_new_tokens, do_sample=False)
    ranked = sorted(
        ((int(count), layer.moe_layer, expert) for layer in layers for expert, count in enumerate(layer.popularity)),
        key=lambda item: (-item[0], item[1], item[2]),
    )[:capacity]
    for layer in layers:
        layer.place([expert for _, moe_layer, expert in ranked if moe_layer == layer.moe_layer])
    total = setup.info.num_moe_layers * setup.info.num_experts
    return LoadedSystem("fiddler", model, f"{capacity}/{total} most popular experts resident, misses on CPU",
                        lambda: counters.copy())


def load_moerun(setup: BenchSetup, budget_bytes: int, policy: str, expert_format: str = "auto") -> LoadedSystem:
    """``moerun.load`` with one policy and expert format; its counters come from ``model.moerun.stats()``.
    Under uniform routing the fast decode path is on (on a CPU too) with the ``UniformRouting`` override."""
    import moerun
    from moerun.checkpoint_quantization import ExpertFormatError
    from moerun.runtime.moe_layer import install_routing_override
    from moerun.runtime.memory import BudgetError

    try:
        model = moerun.load(
            str(setup.checkpoint), policy=policy, vram_budget=budget_bytes, device=setup.device,
            dtype=setup.dtype, max_context=setup.max_context, max_batch=setup.max_batch,
            compile_decode=setup.compile_decode, progress=False, expert_format=expert_format,
        )
    except (BudgetError, ExpertFormatError) as exc:
        raise SystemSkipped(str(exc)) from exc
    handle = model.moerun
    notes = f"policy {Path(policy).name}"
    if setup.routing == "uniform":
        handle.fast_decode = True
        if not handle.fast_decode:
            raise SystemSkipped("uniform routing needs the fast decode path, which is off: "
                                f"{handle.decoder.off_reason}")
        install_routing_override(model, UniformRouting(setup.info.num_experts))  # prefill and decode
        notes += "; uniform routing"
    memory = handle.memory()
    total = setup.info.num_moe_layers * setup.info.num_experts
    slots, fmt = memory["device"]["num_slots"], memory["experts"]["format"]
    return LoadedSystem(f"moerun:{Path(policy).stem}", model, f"{notes}; arena of {slots}/{total} slots",
                        lambda: counters_from_moerun_stats(handle.stats()), expert_format=fmt,
                        slot_bytes=int(memory["experts"]["slot_bytes"]), num_slots=int(slots))


def counters_from_moerun_stats(stats: dict) -> ExpertCounters:
    """``model.moerun.stats()`` totals as :class:`ExpertCounters` (hits, fetches and CPU experts are
    counted per unique expert of a layer step there too)."""
    return ExpertCounters(
        pairs=int(stats["pairs"]),
        loads=int(stats["hits"] + stats["fetches"] + stats["cpu_experts"]),
        gpu_hits=int(stats["hits"]),
        cpu_loads=int(stats["cpu_experts"]),
        copied_bytes=int(stats["bytes_copied"]),
    )


def load_system(name: str, setup: BenchSetup, budget_bytes: int, policy: str | None = None,
                expert_format: str = "auto") -> LoadedSystem:
    """Loads system ``name`` (one of SYSTEMS); ``policy`` is required for ``moerun``, ``expert_format``
    applies to it alone."""
    if name != "moerun":
        if setup.info.packed:
            raise SystemSkipped(f"the checkpoint's experts are published packed ({setup.info.expert_format}); "
                                "the transformers baselines here run float checkpoints only")
        if setup.routing != "model":
            raise SystemSkipped(f"{setup.routing} routing is an override of moerun's routing; the "
                                "baselines route as the model does")
    if name == "hf-resident":
        return load_hf_resident(setup)
    if name == "hf-auto":
        return load_hf_auto(setup, budget_bytes)
    if name == "hf-ondemand":
        return load_hf_ondemand(setup, budget_bytes)
    if name == "fiddler":
        return load_fiddler(setup, budget_bytes)
    if name == "moerun":
        return load_moerun(setup, budget_bytes, policy, expert_format)
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
