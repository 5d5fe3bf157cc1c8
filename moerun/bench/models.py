"""The bench's built-in models: random-weight checkpoints with real MoE shapes, built once and cached.

A :class:`ModelSpec` names a preset (or tiny architecture) of ``moerun.models.synthetic`` and any
overrides; :func:`prepare_checkpoint` builds it with ``moerun.models.synthetic`` into the cache directory the
first time (after checking that the disk has room) and reuses it afterwards, with its routed experts in
float or packed in a published layout (fp8-block128, int4-gG: generated packed, one cache entry per
format). :func:`inspect_checkpoint` reads any checkpoint's config and reports the sizes the bench needs
(total bytes, bytes per expert, the experts' format).
This module knows nothing about the systems that run the checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moerun.bench.budget import format_bytes
from moerun.bench.moe_layers import find_experts


@dataclass(frozen=True)
class ModelSpec:
    """A built-in benchmark model: ``synthetic_config(base, **overrides)``."""

    name: str
    base: str                 # an architecture (tiny shapes) or a preset of moerun.models.synthetic
    description: str
    overrides: dict = field(default_factory=dict)
    checkpoint_format: str = "float"  # how its experts are written when --checkpoint-format is not given


BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tiny", "qwen2_moe", "tiny Qwen2-MoE shapes (the CPU default)"),
        ModelSpec("qwen1.5-moe-a2.7b", "qwen1.5-moe-a2.7b",
                  "Qwen1.5-MoE-A2.7B shapes: 24 layers x 60 experts, top-4, shared expert"),
        ModelSpec("mixtral-8x7b", "mixtral-8x7b",
                  "Mixtral-8x7B shapes with 8 of its 32 layers (to fit the disk): 8 experts, top-2",
                  dict(num_hidden_layers=8)),
        ModelSpec("deepseek-v2-lite", "deepseek-v2-lite",
                  "DeepSeek-V2-Lite shapes: 27 layers (the first dense) x 64 experts, top-6, 2 shared, MLA"),
        ModelSpec("olmoe", "olmoe-1b-7b", "OLMoE-1B-7B shapes: 16 layers x 64 experts, top-8"),
        ModelSpec("qwen3-30b-a3b", "qwen3-30b-a3b",
                  "Qwen3-30B-A3B shapes: 48 layers x 128 experts, top-8, no shared expert, 30.5 B parameters "
                  "(57 GiB in bf16: build it packed, --checkpoint-format int4-g128 is 17 GiB)"),
        ModelSpec("gpt-oss-20b", "gpt-oss-20b",
                  "gpt-oss-20b shapes: 24 layers x 32 experts, top-4, H = I = 2880, sliding window 128 on every other "
                  "layer, experts in MXFP4 as published (13.2 MB an expert; 13 GiB of files)",
                  checkpoint_format="mxfp4"),
        ModelSpec("gpt-oss-120b", "gpt-oss-120b",
                  "gpt-oss-120b shapes: 36 layers x 128 experts, top-4, H = I = 2880, experts in MXFP4 as published "
                  "(61 GiB of files: more than a 64 GB disk holds beside anything else)",
                  checkpoint_format="mxfp4"),
    )
}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CheckpointInfo:
    """Sizes of one checkpoint, read from its config (no weights are loaded)."""

    path: str
    model_type: str
    dtype: torch.dtype
    total_bytes: int          # every parameter
    expert_bytes: int         # one routed expert (gate, up and down projections)
    num_moe_layers: int
    num_experts: int          # routed experts per MoE layer
    top_k: int
    vocab_size: int
    expert_format: str = "float"   # the checkpoint's own expert format ("float" or a packed one)

    @property
    def packed(self) -> bool:
        return self.expert_format != "float"

    @property
    def routed_bytes(self) -> int:
        return self.expert_bytes * self.num_moe_layers * self.num_experts

    @property
    def dense_bytes(self) -> int:
        """Everything that is not a routed expert: what must sit on the GPU whatever the policy."""
        return self.total_bytes - self.routed_bytes


def default_cache_dir() -> Path:
    """``$MOERUN_CACHE/bench``, else ``$XDG_CACHE_HOME/moerun/bench``, else ``~/.cache/moerun/bench``."""
    if os.environ.get("MOERUN_CACHE"):
        return Path(os.environ["MOERUN_CACHE"]) / "bench"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moerun" / "bench"


def spec_config(spec: ModelSpec):
    """The transformers config of a built-in model."""
    from moerun.models.synthetic import synthetic_config

    return synthetic_config(spec.base, **spec.overrides)


def _meta_model(config):
    """The model of ``config`` on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _sizes(config, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(total_bytes, expert_bytes, num_moe_layers, num_experts, top_k) of ``config`` stored in ``dtype``; an
    expert's bytes are its share of every stacked experts parameter (weights, and biases where it has them)."""
    from moerun.models import UnsupportedArchitectureError, adapter_for

    model = _meta_model(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(p.numel() for p in model.parameters()) * itemsize
    try:  # moerun's adapter knows where the experts are, whatever their layout
        adapter = adapter_for(config)
        experts = [model.get_submodule(adapter.block_path(layer)).experts for layer in adapter.moe_layers()]
    except UnsupportedArchitectureError:  # a --model moerun does not run: the baselines' fused layout
        experts = [site.module for site in find_experts(model)]
    if not experts:
        raise ValueError(
            f"{config.model_type}: found no fused routed-experts module (gate_up_proj [E, 2I, H] and "
            "down_proj [E, H, I]); the bench supports MoE models whose experts transformers stores fused"
        )
    first = experts[0]
    num_experts = first.gate_up_proj.shape[0]
    expert_bytes = sum(p.numel() for p in first.parameters()) // num_experts * itemsize
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    return total, expert_bytes, len(experts), num_experts, top_k


def inspect_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None) -> CheckpointInfo:
    """Read ``path``'s config (a directory or a hub id) and size its parameters in ``dtype``.

    ``dtype`` defaults to the checkpoint's own (``config.dtype``), else bfloat16. A checkpoint whose
    experts are published packed (fp8, GPTQ) counts each expert at its slot bytes in that format and the
    dense part in ``dtype`` (moerun dequantizes quantized dense linears at load).
    """
    from transformers import AutoConfig

    from moerun.checkpoint_quantization import read_quantization
    from moerun.models import adapter_for

    config = AutoConfig.from_pretrained(str(path))
    if dtype is None:
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = DTYPES.get(str(stored).replace("torch.", ""), torch.bfloat16)
    total, expert_bytes, layers, experts, top_k = _sizes(config, dtype)
    fmt = read_quantization(config, stacked_experts=adapter_for(config).stacked_experts).expert_format
    if fmt != "float":
        dense_bytes = total - expert_bytes * layers * experts
        expert_bytes = _slot_bytes(config, dtype, fmt)
        total = dense_bytes + expert_bytes * layers * experts
    return CheckpointInfo(
        str(path), config.model_type, dtype, total, expert_bytes, layers, experts, top_k,
        vocab_size=config.vocab_size, expert_format=fmt,
    )


def _slot_bytes(config, dtype: torch.dtype, expert_format: str) -> int:
    """Bytes of one expert slot of ``config`` in ``expert_format`` (moerun's native slot layout)."""
    from moerun.models import adapter_for
    from moerun.native import slot_layout

    adapter = adapter_for(config)
    return slot_layout(dtype, adapter.hidden_size, adapter.expert_inter_size, expert_format,
                       bias=adapter.expert_activation.bias).slot_bytes


def _build_device(total_bytes: int) -> str:
    """Where to sample a model's weights: a GPU with room does in seconds what the CPU does in minutes."""
    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 1.2 * total_bytes:
        return "cuda"
    return "cpu"


def _cache_key(spec: ModelSpec, config, dtype: torch.dtype, seed: int, device: str, expert_format: str) -> str:
    """Directory name: changes whenever the config, seed, dtype, experts' format or sampling device would
    give different weights (CPU and GPU random streams differ)."""
    fields = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    key = {"config": fields, "seed": seed, "dtype": str(dtype), "device": device}
    if expert_format != "float":  # float keys stay those of earlier caches
        key["expert_format"] = expert_format
    payload = json.dumps(key, sort_keys=True, default=str)
    fmt = "" if expert_format == "float" else f"-{expert_format}"
    return f"{spec.name}-{str(dtype).replace('torch.', '')}{fmt}-{hashlib.sha1(payload.encode()).hexdigest()[:10]}"


def check_disk_space(directory: Path, needed_bytes: int, what: str, *, packed: bool = False) -> None:
    """Raise a clear error if ``directory``'s file system has less than ``needed_bytes`` free (``packed``: the
    experts are packed already, so a packed format is no way out)."""
    directory.mkdir(parents=True, exist_ok=True)
    free_bytes = shutil.disk_usage(directory).free
    if free_bytes < needed_bytes:
        way_out = "" if packed else " (or a packed one: --checkpoint-format int4-g128)"
        raise RuntimeError(
            f"{what} needs {format_bytes(needed_bytes)} of disk in {directory}, but only "
            f"{format_bytes(free_bytes)} is free. Free some space, point --cache-dir at a larger disk, "
            f"or pick a smaller --synthetic model{way_out}."
        )


def packed_checkpoint_bytes(config, dtype: torch.dtype, expert_format: str) -> tuple[int, int]:
    """(total, dense) bytes on disk of ``config`` with dense weights in ``dtype`` and routed experts
    ``"float"`` (in ``dtype`` too) or packed in ``expert_format``."""
    from moerun.models.synthetic import packed_expert_bytes

    total, expert_bytes, layers, experts, _ = _sizes(config, dtype)
    dense = total - expert_bytes * layers * experts
    if expert_format == "float":
        return total, dense
    return dense + packed_expert_bytes(config, expert_format, dtype) * layers * experts, dense


def _build_packed(config, path: Path, **kwargs) -> None:
    """build_packed_checkpoint with a progress bar over its shards (a 30 B model takes minutes)."""
    import sys

    from tqdm.auto import tqdm

    from moerun.models.synthetic import build_packed_checkpoint

    with tqdm(desc="  writing shards", unit="shard", leave=False, file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        build_packed_checkpoint(config, path, progress=progress, **kwargs)


def prepare_checkpoint(
    name: str, *, dtype: torch.dtype, cache_dir: Path | None = None, seed: int = 0, log=print,
    expert_format: str | None = None,
) -> Path:
    """The directory of built-in model ``name`` in ``dtype``: built on first use, then reused.

    ``expert_format``: None (the model's own: float, or mxfp4 for gpt-oss as it is published), ``"float"``
    (experts in ``dtype``) or a packed layout of
    ``moerun.models.synthetic.PACKED_FORMATS`` (``"fp8-block128"``, ``"int4-g128"``, ...; ``"int4"`` =
    int4-g128): the experts are generated packed, dense weights stay in ``dtype``; each format is its own
    cache entry. The checkpoint is written to a temporary directory beside its final place and renamed
    when complete, so an interrupted build is never mistaken for a finished one.
    """
    from moerun.models.synthetic import build_checkpoint, packed_format

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    expert_format = spec.checkpoint_format if expert_format is None else expert_format
    fmt = "float" if expert_format == "float" else packed_format(expert_format)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    config = spec_config(spec)
    total_bytes, dense_bytes = packed_checkpoint_bytes(config, dtype, fmt)
    # A packed build holds the dense model and one linear at a time on the device.
    device = _build_device(total_bytes if fmt == "float" else dense_bytes)
    path = cache_dir / _cache_key(spec, config, dtype, seed, device, fmt)
    if (path / "config.json").is_file():
        return path
    # The safetensors files plus headroom for metadata and the partial directory of a crashed build.
    check_disk_space(cache_dir, int(total_bytes * 1.05) + 2**30, f"building the {name} checkpoint ({fmt} experts)",
                     packed=fmt != "float")
    experts = "" if fmt == "float" else f", experts packed in {fmt}"
    log(f"building the {name} checkpoint ({spec.description}; {format_bytes(total_bytes)}, dense weights in "
        f"{str(dtype).replace('torch.', '')}{experts}) in {path} — done once, then cached")

    partial = cache_dir / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if fmt == "float":
            build_checkpoint(config, partial, seed=seed, dtype=dtype, device=device)
        else:
            _build_packed(config, partial, seed=seed, dtype=dtype, device=device, expert_format=fmt)
        if device == "cuda":
            torch.cuda.empty_cache()
        os.replace(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path
