"""``moerun.load``: from a checkpoint to a generate-capable transformers model with offloaded experts.

Order of work, cheapest checks first so bad input fails before anything large is allocated:
resolve the checkpoint (local directory or offline HF cache) -> read config, generation config and
safetensors headers -> pick the architecture adapter -> compile the policy -> plan device memory from
the budget -> build the model skeleton with parameters on the meta device (no expert is ever
materialised) -> check every dense parameter's tensor and shape in the headers -> fill the host
pool with the routed experts from the files -> create the arena, transfer engine and CPU executor ->
replace each MoE block with OffloadedMoE -> read the non-expert weights straight to the device.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .checkpoint import Checkpoint, CheckpointError, read_json_object, resolve_checkpoint
from .dtypes import COMPUTE_DTYPES, DTYPE_NAMES
from .checkpoint_quantization import (CheckpointQuantization, check_expert_tensors, check_stacked_expert_tensors,
                                      dense_elements, expert_tensor_keys, read_dense, read_quantization,
                                      resolve_expert_format)
from .models import MoeAdapter, adapter_for
from .policy.engine_setup import HostTier
from .policy.ir import AUTO, CompiledPolicy
from .runtime.decode_cache import ContextOverflowError
from .transformers_contract import CACHE_ARGUMENT_NAMES
from .runtime.fast_decode import FastDecoder
from .runtime.handle import MoerunHandle
from .runtime.memory import (AUTO_MARGIN_BYTES, BudgetError, MemoryPlan, check_prefill_chunk, fmt_bytes, parse_bytes,
                             plan_memory,
                             slot_elems)
from .runtime.moe_layer import OffloadedMoE
from .runtime.offload import OffloadRuntime, learned_predictor

_MAX_CONFIG_BYTES = 16 << 20  # a config.json is kilobytes
_NO_HOST_MEMORY_CHECK = "MOERUN_NO_HOST_MEMORY_CHECK"  # "1": trust that host memory grows on use (balloon VMs)


class LoadError(ValueError):
    """An argument of :func:`load` or :func:`memory_plan` that cannot work; the message names it
    and what to pass instead. (Checkpoints, budgets and policies have their own error types.)"""


def _whole(name: str, value, lo: int, hi: int) -> int:
    """``value`` when it is an int in ``lo..hi``; LoadError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoadError(f"{name} must be a whole number (int), not {value!r} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise LoadError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _check_arguments(*, max_context, max_batch, cpu_threads=0, copy_streams=2, fast_decode=None,
                     compile_decode=False, revision="main", prefill_chunk=None) -> None:
    """Types and ranges of load()'s plain arguments, before any file is opened."""
    _whole("max_context", max_context, 1, 2**31 - 1)
    _whole("max_batch", max_batch, 1, 2**31 - 1)
    try:
        check_prefill_chunk(prefill_chunk, max_context=max_context, max_batch=max_batch)
    except ValueError as exc:
        raise LoadError(str(exc)) from None
    _whole("cpu_threads", cpu_threads, 0, 4096)  # 0 = the default: one per physical core but one
    try:
        _whole("copy_streams", copy_streams, 2, 64)
    except LoadError as exc:  # one stream for demand copies, at least one for prefetches
        raise LoadError(f"{exc} (one stream copies demanded experts, the others prefetches; 2 is the "
                        "fewest that works)") from None
    if fast_decode is not None and not isinstance(fast_decode, bool):
        raise LoadError(f"fast_decode must be True, False or None (the device decides), not {fast_decode!r}")
    if not isinstance(compile_decode, bool):
        raise LoadError(f"compile_decode must be True or False, not {compile_decode!r}")
    if not isinstance(revision, str) or not revision:
        raise LoadError(f"revision must be a branch, tag or commit name (str), not {revision!r}")


def load(
    model: str | os.PathLike,
    policy: str | os.PathLike | CompiledPolicy = "balanced.moe",
    vram_budget: str | int = "auto",
    host_budget: str | int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    expert_format: str = "auto",
    max_context: int = 4096,
    max_batch: int = 1,
    prefill_chunk: int | None = None,
    revision: str = "main",
    cpu_threads: int = 0,
    copy_streams: int = 2,
    fast_decode: bool | None = None,
    compile_decode: bool = False,
    progress: bool = True,
) -> PreTrainedModel:
    """Load an MoE checkpoint with its routed experts offloaded under ``policy``.

    Args:
        model: a checkpoint directory or a hub id already in the local Hugging Face cache.
        policy: ``.moe`` text, a path to a ``.moe`` file, a bundled policy name, or a CompiledPolicy.
        vram_budget: device bytes for everything moerun and the model allocate (int, ``"10GiB"``),
            or ``"auto"`` (free device memory minus a margin).
        host_budget: host bytes for the expert pool (int, ``"8GiB"``); None = no limit. Below the
            routed experts' size (or with a smaller ``host { capacity }`` in the policy: the smaller
            wins) the pool holds that many experts and reads the others from the files on demand.
        device: where the dense part and the arena live; default CUDA when available, else CPU.
        dtype: compute dtype; default the checkpoint's (``config.dtype``).
        expert_format: how routed experts are kept in host memory and in the arena: ``"auto"`` (the
            checkpoint's own: float, or an fp8 / GPTQ checkpoint's format), ``"fp8"``, ``"fp8-block128"``,
            ``"int8"``, ``"int4"`` (= ``"int4-g128"``), ``"int4-g32"``, ``"int4-g64"``, ``"mxfp4"`` (a float
            checkpoint quantized at load), or ``"bf16"`` / ``"fp16"`` / ``"fp32"`` / ``"float"`` (the compute
            dtype). A pre-quantized checkpoint keeps its own format, or decodes into ``"float"`` where that
            is exact in the compute dtype (MXFP4: fp32 or bf16; GPTQ, fp8 with BF16 scales: fp32); any other
            conversion is an error.
        max_context, max_batch: the KV cache and activations the budget reserves room for; the fast
            decode path's static KV cache holds max_batch sequences of max_context tokens.
        prefill_chunk: tokens (all sequences together) of the largest forward the budget reserves
            activations for; a longer prompt is prefilled in chunks over the same KV cache (the same
            cache and logits as one forward). None (auto): max_batch x max_context, no prompt is
            chunked; an int in max_batch..max_batch x max_context reserves less and gives the arena the rest.
        revision: the hub revision to resolve from the local cache (ignored for a directory).
        cpu_threads: threads that compute CPU experts, the calling thread included (it works while it
            waits for them), and read experts into the host pool; 0 = defaults (for CPU experts one per
            physical core but one).
        copy_streams: CUDA streams the transfer engine copies experts on, 2..64 (demand copies on the
            first, prefetches on the others).
        fast_decode: decode steps as CUDA graphs over a static KV cache (default: on for CUDA);
            ``model.moerun.fast_decode`` switches it later. Where the model cannot use it, it stays
            off with a one-line notice and decoding runs through transformers' layers.
        compile_decode: fuse the fast path's small kernels with ``torch.compile`` (inductor) before
            its graphs are captured; decode steps get faster and the first generation of each batch
            shape takes longer (every segment compiles once, tens of seconds for a 24-layer model).
    Returns:
        A transformers ``PreTrainedModel`` (``generate()`` works) with a ``model.moerun`` handle.
    """
    _check_arguments(max_context=max_context, max_batch=max_batch, cpu_threads=cpu_threads,
                     copy_streams=copy_streams, fast_decode=fast_decode, compile_decode=compile_decode,
                     revision=revision, prefill_chunk=prefill_chunk)
    stages = _Stages()
    device = _pick_device(device)
    path, config, adapter, ckpt, dtype, quant = _open_checkpoint(model, revision, dtype)
    generation_config = _read_generation_config(path)
    fmt = resolve_expert_format(expert_format, quant, dtype, _expert_scale_dtypes(ckpt, adapter, quant))
    moe_layers = adapter.moe_layers()
    compiled = _compile_policy(policy, len(moe_layers), adapter.num_experts)
    non_expert = [k for k in ckpt.tensors if not adapter.is_routed_expert_key(k)]
    plan = _plan(adapter, ckpt, quant, non_expert, dtype, fmt, vram_budget, device, max_context, max_batch,
                 check_free=True, prefill_chunk=prefill_chunk)
    from .policy_engine import PolicyEngine

    # The policy's whole setup (engine config, runtime switches, host tier), checked against the model
    # and the slots before anything large is allocated.
    engine = PolicyEngine(compiled, num_layers=len(moe_layers), num_experts=adapter.num_experts, top_k=adapter.top_k,
                          num_slots=plan.num_slots, expert_bytes=plan.slot_bytes)
    predictor = learned_predictor(engine.setup, num_layers=len(moe_layers), num_experts=adapter.num_experts,
                                  top_k=adapter.top_k)
    if host_budget is not None:
        _check_host_budget(host_budget)
    host_capacity = _host_capacity(engine.setup.host, host_budget, plan.slot_bytes,
                                   len(moe_layers) * adapter.num_experts, adapter.top_k)
    _check_host_memory(host_capacity * plan.slot_bytes, plan, device)

    stages.mark("checkpoint and plan")

    bar = tqdm(total=3, desc=f"moerun.load {path.name}", disable=not progress, unit="stage")
    hf_model = _build_skeleton(config, dtype)
    _check_dense_tensors(hf_model, ckpt, quant, adapter, non_expert)
    _check_dense_dtypes(hf_model, ckpt, adapter, non_expert)
    stages.mark("skeleton")
    runtime = _build_runtime(engine, adapter, ckpt, quant, plan, moe_layers, device, dtype,
                             cpu_threads, copy_streams, host_capacity, bar, predictor, stages)
    runtime.fill_arena()
    stages.mark("arena fill")
    bar.set_postfix_str("dense weights"); bar.update()
    _replace_moe_blocks(hf_model, adapter, runtime, moe_layers)
    _load_dense_weights(hf_model, ckpt, quant, adapter, non_expert, device, dtype, progress)
    stages.mark("dense weights")
    bar.update()
    if generation_config is not None:
        hf_model.generation_config = generation_config
    hf_model.eval()
    decoder = FastDecoder(hf_model, adapter, runtime, max_context=max_context, max_batch=max_batch,
                          device=device, dtype=dtype, compile_backend="inductor" if compile_decode else None)
    decoder.install(hf_model)
    _limit_context(hf_model, decoder, max_context)
    decoder.set_enabled(device.type == "cuda" if fast_decode is None else fast_decode)
    hf_model.moerun = MoerunHandle(
        model=hf_model, runtime=runtime, decoder=decoder, plan=plan, moe_layers=moe_layers, checkpoint_path=path,
        pool_bytes=runtime.pool.total_bytes,
        policy=compiled,
        model_info={"model_type": config.model_type, "path": str(path), "hidden_size": adapter.hidden_size,
                    "inter_size": adapter.expert_inter_size, "num_experts": adapter.num_experts,
                    "top_k": adapter.top_k, "dtype": str(dtype).replace("torch.", ""), "expert_format": fmt,
                    "checkpoint_quantization": quant.encoding},
    )
    stages.mark("handle")
    hf_model.moerun.load_seconds = stages.seconds
    bar.update(); bar.close()
    return hf_model


def memory_plan(
    model: str | os.PathLike,
    vram_budget: str | int = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    expert_format: str = "auto",
    max_context: int = 4096,
    max_batch: int = 1,
    prefill_chunk: int | None = None,
    revision: str = "main",
) -> MemoryPlan:
    """How :func:`load` would split ``vram_budget`` for ``model``, without loading anything.

    ``plan.min_budget_bytes`` is the smallest budget that works; ``plan.num_slots`` the expert
    slots this budget gives. A budget above the device's free memory is planned as given (a plan for
    another machine, or "how would everything fit"); :func:`load` refuses it.
    """
    _check_arguments(max_context=max_context, max_batch=max_batch, revision=revision, prefill_chunk=prefill_chunk)
    device = _pick_device(device)
    _, _, adapter, ckpt, dtype, quant = _open_checkpoint(model, revision, dtype)
    fmt = resolve_expert_format(expert_format, quant, dtype, _expert_scale_dtypes(ckpt, adapter, quant))
    non_expert = [k for k in ckpt.tensors if not adapter.is_routed_expert_key(k)]
    return _plan(adapter, ckpt, quant, non_expert, dtype, fmt, vram_budget, device, max_context, max_batch,
                 check_free=False, prefill_chunk=prefill_chunk)


def _pick_device(device) -> torch.device:
    try:
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise LoadError(f"device {device!r} is not a device name: use 'cuda', 'cuda:N' or 'cpu' ({exc})") from None
    if device.type not in ("cuda", "cpu"):
        raise LoadError(f"device must be a CUDA device or 'cpu', not {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"device {str(device)!r} asked for, but this torch sees no CUDA device "
                            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if not 0 <= device.index < torch.cuda.device_count():
            raise LoadError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return device


def _open_checkpoint(model, revision: str, dtype):
    path = resolve_checkpoint(model, revision=revision)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json; is it a transformers checkpoint directory?")
    read_json_object(config_file, "config.json", _MAX_CONFIG_BYTES)  # a regular file holding a JSON object
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers and huggingface_hub raise many types for a bad config
        if isinstance(exc, MemoryError):
            raise
        raise CheckpointError(f"{config_file}: transformers cannot read this config ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]})") from None
    adapter = adapter_for(config)
    _check_config_shape(config_file, adapter)
    ckpt = Checkpoint(path)
    _check_layers_and_experts(ckpt, adapter)
    quant = read_quantization(config, stacked_experts=adapter.stacked_experts)
    _check_expert_tensors(ckpt, adapter, quant)
    return path, config, adapter, ckpt, _pick_dtype(dtype, config, ckpt, adapter, quant), quant


def _plan(adapter, ckpt, quant, non_expert, dtype, expert_format, vram_budget, device, max_context, max_batch, *,
          check_free: bool, prefill_chunk: int | None = None) -> MemoryPlan:
    if max_context < 1 or max_batch < 1:
        raise ValueError(f"max_context and max_batch must be >= 1, got {max_context} and {max_batch}")
    return plan_memory(
        adapter,
        skeleton_bytes=dense_elements(ckpt, non_expert, quant) * dtype.itemsize,
        dtype=dtype,
        expert_format=expert_format,
        budget_bytes=_budget_bytes(vram_budget, device, check_free),
        max_context=max_context,
        max_batch=max_batch,
        max_slots=len(adapter.moe_layers()) * adapter.num_experts,
        prefill_chunk=prefill_chunk,
    )


# -- checks -----------------------------------------------------------------------------------------
def _check_config_shape(config_file: Path, adapter: MoeAdapter) -> None:
    """The model shape the config gives is whole numbers that fit together (top_k <= experts)."""
    shape = {}
    for name in ("num_layers", "num_experts", "top_k", "hidden_size", "expert_inter_size"):
        try:
            value = getattr(adapter, name)
        except (AttributeError, TypeError) as exc:
            raise CheckpointError(f"{config_file}: no {name} for {adapter.model_type} ({exc})") from None
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
            raise CheckpointError(f"{config_file}: {name} must be a whole number >= 1, got {value!r}")
        shape[name] = value
    if shape["top_k"] > shape["num_experts"]:
        raise CheckpointError(f"{config_file}: {shape['top_k']} experts per token but {shape['num_experts']} experts")
    if not adapter.moe_layers():
        raise CheckpointError(f"{config_file}: the config has no MoE layer; moerun offloads routed experts only")


def _check_layers_and_experts(ckpt: Checkpoint, adapter: MoeAdapter) -> None:
    """No decoder layer or routed expert in the files beyond what the config describes (a config that
    undercounts would load silently without them). Multi-token-prediction layers right after the
    last decoder layer (DeepSeek-V3's ``num_nextn_predict_layers``) are allowed; transformers drops them."""
    extra = getattr(adapter.config, "num_nextn_predict_layers", 0) or 0
    layers = adapter.num_layers + (extra if isinstance(extra, int) else 0)
    for key in ckpt.tensors:
        match = re.match(r"model\.layers\.(\d+)\.", key)
        if match and int(match.group(1)) >= layers:
            raise CheckpointError(f"{ckpt.path}: {key} is in layer {match.group(1)}, but config.json gives "
                                  f"{adapter.num_layers} layers; the config does not match the weights")
        expert = adapter._expert_key_re.match(key)  # group 2 is None for stacked experts (shapes are checked)
        if expert and expert.group(2) is not None and int(expert.group(2)) >= adapter.num_experts:
            raise CheckpointError(f"{ckpt.path}: {key} is expert {expert.group(2)}, but config.json gives "
                                  f"{adapter.num_experts} experts per layer; the config does not match the weights")


def _read_generation_config(path: Path) -> GenerationConfig | None:
    """The checkpoint's generation_config.json (None when it has none), read before anything large is
    allocated; a file transformers cannot read is a CheckpointError naming it."""
    file = path / "generation_config.json"
    if not file.exists():
        return None
    read_json_object(file, "generation_config.json", _MAX_CONFIG_BYTES)  # a regular file holding a JSON object
    try:
        return GenerationConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError for a bad field
        if isinstance(exc, MemoryError):
            raise
        raise CheckpointError(f"{file}: transformers cannot read this generation config ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}); repair the file, or move it out of the "
                              "checkpoint directory to generate with transformers' defaults") from None


def _dense_parameters(model: nn.Module, adapter: MoeAdapter) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every skeleton parameter the checkpoint's dense tensors must fill: everything but
    the routed experts (an MoE block keeps only its router and shared modules, as OffloadedMoE does) and
    the weights tie_weights() fills from another (the output embeddings, when the config ties them)."""
    blocks = tuple(adapter.block_path(layer) + "." for layer in adapter.moe_layers())
    kept = tuple(name + "." for name in (adapter.router_attr, *adapter.shared_modules))
    tied = getattr(model, "_tied_weights_keys", None) or ()
    tied = set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()
    out = {}
    for name, param in model.named_parameters():
        block = next((b for b in blocks if name.startswith(b)), None)
        if (block is None or name[len(block):].startswith(kept)) and name not in tied:
            out[name] = tuple(param.shape)
    return out


def _dense_tensor_shapes(ckpt: Checkpoint, quant: CheckpointQuantization, adapter: MoeAdapter,
                         keys: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Module name -> (checkpoint key, shape once dequantized) of the dense tensors, from the headers: a
    GPTQ linear's ``qweight`` [in/8, out] fills ``weight`` [out, in]; an fp8 weight keeps its shape."""
    out = {}
    for key in keys:
        shape = ckpt.tensors[key].shape
        if quant.encoding in ("gptq", "gptq-v2") and key.endswith(".qweight") and len(shape) == 2:
            key_name, shape = key[: -len(".qweight")] + ".weight", (shape[1], shape[0] * 8)
        else:
            key_name = key
        out[adapter.module_key(key_name)] = (key, tuple(shape))
    return out


def _check_dense_tensors(model: nn.Module, ckpt: Checkpoint, quant: CheckpointQuantization, adapter: MoeAdapter,
                         keys: list[str]) -> None:
    """Every dense parameter of the skeleton built from config.json has a tensor in the checkpoint, of its
    shape (headers only): one CheckpointError listing every fault, before the host pool is allocated."""
    want = _dense_parameters(model, adapter)
    have = _dense_tensor_shapes(ckpt, quant, adapter, keys)
    missing = [name for name in want if name not in have]
    wrong = [f"{have[name][0]} {list(have[name][1])} (the model wants {list(shape)})"
             for name, shape in want.items() if name in have and have[name][1] != shape]
    if not missing and not wrong:
        return

    def listed(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")

    faults = ([f"no tensor for {listed(missing)}"] if missing else []) + (
        [f"shapes that differ from config.json's model: {listed(wrong)}"] if wrong else [])
    raise CheckpointError(
        f"{ckpt.path}: the weights do not match the model its config.json describes: {'; '.join(faults)}. "
        "A shard missing from the directory or the index, or a config.json from another model, does this: "
        "re-download or re-save the checkpoint, or put back the config.json these weights were saved with.")


def _check_dense_dtypes(model: nn.Module, ckpt: Checkpoint, adapter: MoeAdapter, keys: list[str]) -> None:
    """Every checkpoint tensor that fills a parameter of the skeleton is floating point (an int32
    weight would be taken as is and fail, or compute garbage, at the first forward)."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for key in keys:
        info = ckpt.tensors[key]
        if adapter.module_key(key) in params and not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: {key} is {info.dtype}; model weights must be floating point "
                                  "(quantised checkpoints are not supported)")


def _host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), or None where unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f.read(1 << 16).decode("ascii", "replace").splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_host_memory(pool_bytes: int, plan: MemoryPlan, device: torch.device) -> None:
    """The host pool (and, on a CPU device, the dense part and the arena too) fits the host's
    available memory; running out later would mean the OOM killer, not an error. A VM whose memory
    grows as it is used (a balloon) reports too little: ``MOERUN_NO_HOST_MEMORY_CHECK=1`` skips this."""
    available = None if os.environ.get(_NO_HOST_MEMORY_CHECK) == "1" else _host_available_bytes()
    if available is None:
        return
    need, parts = pool_bytes, f"the host pool's {fmt_bytes(pool_bytes)}"
    if device.type == "cpu":
        dense = plan.fixed_bytes + plan.arena_bytes
        need += dense
        parts += f" + {fmt_bytes(dense)} of weights, KV cache, workspace and arena (device='cpu')"
    if need > available:
        raise BudgetError(
            f"loading needs {fmt_bytes(need)} of host memory ({parts}) but only {fmt_bytes(available)} is "
            "available (MemAvailable); pass a host_budget below the available memory (the pool then reads the "
            f"other experts from disk), or free memory (or set {_NO_HOST_MEMORY_CHECK}=1 where memory grows on use)")


def _check_host_budget(host_budget) -> None:
    """A host budget above the machine's memory is a typo, not a limit."""
    budget = parse_bytes(host_budget, "host_budget")
    if os.environ.get(_NO_HOST_MEMORY_CHECK) == "1":
        return
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    if total and budget > total:
        raise BudgetError(f"host_budget {fmt_bytes(budget)} is more than this machine's {fmt_bytes(total)} of "
                          "memory; pass at most that, or host_budget=None (no limit)")


def _limit_context(model, decoder: FastDecoder, max_context: int) -> None:
    """A forward that would hold more than ``max_context`` tokens per sequence (what the memory plan
    reserved KV cache and activations for) raises ContextOverflowError before it runs, on every
    path: the fast path's static cache checks its own writes the same way."""
    def hook(module, args, kwargs):
        cache = next((kwargs[name] for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None), None)
        if decoder.cache.owns(cache):
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return
        written = int(cache.get_seq_length()) if cache is not None else 0
        if written + tokens.shape[1] > max_context:
            raise ContextOverflowError(
                f"this forward would hold {written + tokens.shape[1]} tokens per sequence, but the model was "
                f"loaded with max_context={max_context} (prompt + generated; the memory plan reserves no more). "
                "Load it with a larger max_context, or shorten the prompt or max_new_tokens.")

    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def _check_expert_tensors(ckpt: Checkpoint, adapter: MoeAdapter, quant: CheckpointQuantization) -> None:
    """Every routed expert's gate/up/down is in the checkpoint with the shapes and dtypes the config and
    the checkpoint's quantization imply."""
    h, i = adapter.hidden_size, adapter.expert_inter_size
    for layer in adapter.moe_layers():
        if quant.stacked:
            check_stacked_expert_tensors(ckpt, adapter.stacked_expert_prefix(layer), adapter.num_experts, h, i, quant)
            continue
        for expert in range(adapter.num_experts):
            check_expert_tensors(ckpt, _expert_prefixes(adapter, layer, expert), [(i, h), (i, h), (h, i)], quant)


def _expert_scale_dtypes(ckpt: Checkpoint, adapter: MoeAdapter, quant: CheckpointQuantization) -> set[torch.dtype]:
    """dtypes of the routed experts' fp8 block scales (whether they decode exactly into floats depends on it)."""
    if quant.encoding != "fp8-block128":
        return set()
    return {info.dtype for key, info in ckpt.tensors.items()
            if key.endswith(".weight_scale_inv") and adapter.is_routed_expert_key(key)}


def _expert_prefixes(adapter: MoeAdapter, layer: int, expert: int) -> list[str]:
    """gate, up, down keys without their last part ("weight"), under which a quantized checkpoint keeps
    its other tensors of the same linear; for stacked experts the layer's one ``experts.`` prefix (the
    pool's reader takes expert ``expert``'s slice of each tensor)."""
    if adapter.stacked_experts:
        return [adapter.stacked_expert_prefix(layer)]
    keys = adapter.expert_keys(layer, expert)
    return [key[: -len("weight")] for key in (keys.gate, keys.up, keys.down)]


def _pick_dtype(dtype, config, ckpt: Checkpoint, adapter: MoeAdapter, quant: CheckpointQuantization) -> torch.dtype:
    """load()'s ``dtype`` (a torch dtype or one of DTYPE_NAMES), else config.json's, else the experts' own;
    LoadError naming where a dtype moerun cannot compute in came from."""
    if dtype is not None:
        return _compute_dtype(dtype, f"dtype={dtype!r}", "pass")
    where = f"{ckpt.path / 'config.json'} gives \"dtype\": "
    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        return _compute_dtype(dtype, where + f'"{str(dtype).removeprefix("torch.")}"',
                              "load it with dtype= set to")
    first = expert_tensor_keys(_expert_prefixes(adapter, adapter.moe_layers()[0], 0), quant)[0]
    dtype = ckpt.tensors[first].dtype
    return dtype if dtype in COMPUTE_DTYPES else torch.bfloat16  # a quantized checkpoint without config.dtype


def _compute_dtype(value, where: str, remedy: str) -> torch.dtype:
    """``value`` (a torch dtype or a name of DTYPE_NAMES, any case) as a compute dtype; LoadError saying
    ``where`` it came from and ``remedy`` (a phrase followed by the dtypes that work) otherwise."""
    dtype = DTYPE_NAMES.get(value.strip().lower()) if isinstance(value, str) else value
    if dtype not in COMPUTE_DTYPES:
        raise LoadError(f"{where}: moerun computes in {', '.join(str(d) for d in COMPUTE_DTYPES)}; {remedy} "
                        f"one of them (or its name: {', '.join(DTYPE_NAMES)})")
    return dtype


def _compile_policy(policy, num_layers: int | None = None, num_experts: int | None = None) -> CompiledPolicy:
    """A CompiledPolicy from text, a path or a bundled name (checked against the model's shape)."""
    if isinstance(policy, CompiledPolicy):
        return policy
    from .policy import compile_policy

    return compile_policy(policy, num_layers=num_layers, num_experts=num_experts)


def _host_capacity(host: HostTier, host_budget, slot_bytes: int, num_routed: int, top_k: int) -> int:
    """Experts the host pool holds: every routed expert, or fewer (a cache in front of the files) when
    ``host_budget`` or the policy's ``host { capacity }`` is smaller; the smaller of the two wins."""
    capacity, limited_by = num_routed, None
    if host_budget is not None:
        budget = parse_bytes(host_budget, "host_budget")
        if budget // slot_bytes < capacity:
            capacity, limited_by = budget // slot_bytes, f"host_budget {host_budget} ({fmt_bytes(budget)})"
    if host.capacity != AUTO and host.capacity < capacity:
        capacity, limited_by = host.capacity, f"the policy's host capacity {host.capacity}"
    if capacity < top_k:
        raise BudgetError(
            f"{limited_by} holds {capacity} experts of {fmt_bytes(slot_bytes)} in host memory, but one layer "
            f"step uses top_k = {top_k} experts at once; the smallest host budget that works is "
            f"{top_k * slot_bytes} bytes ({fmt_bytes(top_k * slot_bytes)}), and every expert "
            f"({fmt_bytes(num_routed * slot_bytes)}) needs no disk reads"
        )
    return capacity


def _budget_bytes(vram_budget, device: torch.device, check_free: bool) -> int:
    if not (isinstance(vram_budget, str) and vram_budget.strip().lower() == "auto"):
        budget = parse_bytes(vram_budget, "vram_budget", "or 'auto' (free device memory minus a margin)")
        if device.type == "cuda" and check_free:
            free, total = torch.cuda.mem_get_info(device)
            if budget > free:
                raise BudgetError(
                    f"vram_budget {fmt_bytes(budget)} ({budget} bytes) is more than the {fmt_bytes(free)} free on "
                    f"{device} (of {fmt_bytes(total)}); pass at most {free} bytes, or vram_budget='auto' "
                    "(free memory minus a margin)")
        return budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - max(AUTO_MARGIN_BYTES, free // 20))
    # On the host, "auto" leaves half of the available memory to the host pool and the rest.
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return max(1, pages * os.sysconf("SC_PAGE_SIZE") // 2)


# -- skeleton ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside are moved to the meta device; buffers (rotary tables) stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _build_skeleton(config, dtype: torch.dtype) -> PreTrainedModel:
    # A quantized checkpoint's dense linears are dequantized at load: the skeleton is a float model.
    if getattr(config, "quantization_config", None) is not None:
        config = copy.deepcopy(config)
        del config.quantization_config
    with _parameters_on_meta(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Eager experts: the fused-experts parameters are meta and removed right after.
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _replace_moe_blocks(model: nn.Module, adapter: MoeAdapter, runtime: OffloadRuntime,
                        moe_layers: list[int]) -> None:
    new_blocks = []
    for index, layer in enumerate(moe_layers):
        parent_name, _, attr = adapter.block_path(layer).rpartition(".")
        block = model.get_submodule(adapter.block_path(layer))
        new = OffloadedMoE(block, layer=layer, moe_index=index, adapter=adapter, runtime=runtime)
        setattr(model.get_submodule(parent_name), attr, new)
        new_blocks.append(new)

    def decoder_layer(block: OffloadedMoE) -> nn.Module:
        return model.get_submodule(adapter.block_path(block.layer).rpartition(".")[0])

    for block, nxt in zip(new_blocks, new_blocks[1:]):
        next_norm = getattr(decoder_layer(nxt), "post_attention_layernorm", None)
        if next_norm is None:  # a layout without that norm: no lookahead prediction for this pair
            continue
        block.link_lookahead(nxt.moe_index, nxt.gate, next_norm)
        decoder_layer(block).register_forward_hook(block.after_layer)


def _load_dense_weights(model: nn.Module, ckpt: Checkpoint, quant: CheckpointQuantization, adapter: MoeAdapter,
                        keys: list[str], device: torch.device, dtype: torch.dtype, progress: bool) -> None:
    """Read every non-expert tensor from the files straight to ``device`` (quantized linears dequantized);
    check nothing is left."""
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules", None) or ())
    targets = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for key, tensor in tqdm(read_dense(ckpt, keys, quant, device), total=len(keys), desc="dense weights",
                            disable=not progress, leave=False):
        name = adapter.module_key(key)
        if name not in targets and name not in buffers:
            continue  # e.g. multi-token-prediction layers past num_hidden_layers, which HF also drops
        want = torch.float32 if any(p in name for p in keep_fp32) else dtype
        tensor = tensor.to(want) if tensor.is_floating_point() else tensor
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in targets:
            old = targets[name]
            if tuple(old.shape) != tuple(tensor.shape):
                raise CheckpointError(f"{key}: shape {list(tensor.shape)} in the checkpoint, "
                                      f"{list(old.shape)} in the model built from config.json")
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{ckpt.path}: no tensor for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for name, buf in list(model.named_buffers()):  # non-persistent buffers built on the host
        if buf.device != device:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = buf.to(device)


# -- runtime ----------------------------------------------------------------------------------------
class _Stages:
    """Wall seconds of load()'s stages, in order (``model.moerun.load_seconds``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        """The stage ``name`` ended now (it began at the previous mark)."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def _build_runtime(engine, adapter: MoeAdapter, ckpt: Checkpoint, quant: CheckpointQuantization, plan: MemoryPlan,
                   moe_layers: list[int], device: torch.device, dtype: torch.dtype,
                   cpu_threads: int, copy_streams: int, host_capacity: int, bar,
                   predictor=None, stages: _Stages | None = None) -> OffloadRuntime:
    """Host pool (filled from the files), arena, transfer engine, CPU executor and policy engine."""
    from .native import CpuExecutor, ExpertArena, HostPool, TransferEngine

    num_layers, num_experts, elems = len(moe_layers), adapter.num_experts, plan.slot_elems
    # Pinned only when copies go to a GPU: pinning host memory for a CPU-only run buys nothing.
    # Below every expert, the pool is a cache: fill() records the sources and misses read them.
    host = engine.setup.host
    pool = HostPool(num_layers, num_experts, adapter.hidden_size, adapter.expert_inter_size, dtype,
                    pinned=device.type == "cuda", capacity=host_capacity, eviction=host.eviction,
                    high_watermark=host.high_watermark, low_watermark=host.low_watermark, format=plan.expert_format,
                    bias=adapter.expert_activation.bias)
    if stages:
        stages.mark("host pool: allocate (pin)")
    bar.set_postfix_str("experts -> host pool")
    for index, layer in enumerate(tqdm(moe_layers, desc="experts -> host pool", unit="layer",
                                       disable=bar.disable, leave=False)):
        entries = []
        for expert in range(num_experts):
            keys = expert_tensor_keys(_expert_prefixes(adapter, layer, expert), quant)
            entries.append((index, expert, [(str(ckpt.tensors[k].file), k) for k in keys]))
        pool.fill(entries, num_threads=cpu_threads, encoding=quant.encoding)
    if stages:
        stages.mark("host pool: fill from files")
    arena = ExpertArena(plan.num_slots, elems, dtype, device, num_layers, num_experts)
    transfer = TransferEngine(arena, pool, copy_streams)
    cpu_executor = CpuExecutor(cpu_threads)
    if stages:
        stages.mark("arena, transfer engine, CPU executor")
    return OffloadRuntime(
        engine=engine, arena=arena, pool=pool, transfer=transfer, cpu_executor=cpu_executor,
        layout=pool.layout, num_layers=num_layers, num_experts=num_experts,
        slot_bytes=plan.slot_bytes, device=device,
        lookahead=engine.setup.lookahead, observe_timings=engine.setup.observe_timings, predictor=predictor,
        activation=adapter.expert_activation,
    )
