"""What a checkpoint's quantization means for loading it: how its routed experts are encoded on disk,
which expert format the host pool keeps them in (the user's ``expert_format`` against the checkpoint's
own), the tensors each expert's slot is read from, and its quantized dense weights dequantized once.

Checkpoints read as they are published (``config.json``'s ``quantization_config``):
- none: float experts (fp32 / fp16 / bf16); any expert format, quantized at load when asked;
- ``quant_method: "fp8"`` with ``weight_block_size: [128, 128]`` (DeepSeek-V3, Qwen3 ``*-FP8``): every
  linear's ``weight`` in float8 e4m3 and ``weight_scale_inv`` per 128x128 block; experts stay fp8-block128;
- ``quant_method: "gptq"``, 4 bits, ``desc_act: false``, group 32 / 64 / 128 (Qwen's ``*-GPTQ-Int4``):
  ``qweight`` / ``qzeros`` / ``scales`` per linear; experts stay int4-g{group};
- stacked experts (gpt-oss: one tensor per projection holds a layer's experts, with biases): float
  (``gate_up_proj`` [E, H, 2I], gate and up interleaved, ``x @ W``; encoding "gpt-oss-float", any expert
  format at load), or ``quant_method: "mxfp4"`` as published on the hub (``*_blocks`` e2m1 pairs and
  ``*_scales`` e8m0 per 32 inputs; encoding "gpt-oss-mxfp4", experts stay mxfp4); only the experts are
  quantized there, the dense weights are float.
A pre-quantized checkpoint asked for another expert format is refused unless the conversion is exact: its
experts decode into float slots (``expert_format="float"``) where every weight is representable in the model
dtype (:data:`EXACT_FLOAT_DECODES`), and no other conversion is made. Its dense linears (attention, shared
experts, dense MLPs) are dequantized to the compute dtype at load: moerun offloads experts, it does not run
quantized dense kernels.

This module reads configs and tensors; it knows nothing about pools, slots or devices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .checkpoint import Checkpoint, CheckpointError

# The tensors under a layer's ``mlp.experts.`` prefix of the stacked (gpt-oss) encodings, in the order the host
# pool reads them (csrc/expert_files.h).
GPT_OSS_FLOAT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
GPT_OSS_MXFP4_TENSORS = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                         "down_proj_blocks", "down_proj_scales", "down_proj_bias")
MXFP4_BLOCK = 32  # inputs per e8m0 scale (16 bytes of e2m1 pairs)

# User-facing names beside the canonical ones (moerun.native.EXPERT_FORMATS).
FLOAT_ALIASES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMAT_ALIASES = {"int4": "int4-g128"}
GPTQ_GROUPS = (32, 64, 128)


# Packed experts decode exactly into these float dtypes, and why (by source encoding): the format's decode
# (csrc/expert_format.h, one fp32 multiply) is the checkpoint's value exactly, and the dtype holds it. The
# native reader (csrc/expert_files.cpp, check_encoding_fits) admits the same conversions.
_MXFP4_WHY = ("an e2m1 value (2 significant bits) times a power of two fits float32 and bfloat16 (the same "
              "exponent range), not float16's range")
_GPTQ_WHY = ("(q - zero) (5 bits) times an fp16 scale (11 significant bits) needs up to 16 significant bits: "
             "float32 holds 24, bfloat16 8, float16 11")
EXACT_FLOAT_DECODES: dict[str, tuple[tuple[torch.dtype, ...], str]] = {
    "gpt-oss-mxfp4": ((torch.float32, torch.bfloat16), _MXFP4_WHY),
    "gptq": ((torch.float32,), _GPTQ_WHY),
    "gptq-v2": ((torch.float32,), _GPTQ_WHY),
    # with BF16 weight_scale_inv; F32 scales make no float decode exact (_check_float_decode)
    "fp8-block128": ((torch.float32,), "e4m3 (4 significant bits) times a BF16 scale (8) needs up to 12 "
                                       "significant bits: float32 holds 24, bfloat16 8, float16 11"),
}


class ExpertFormatError(ValueError):
    """An expert format that cannot be used with this checkpoint, or a quantization moerun cannot read."""


@dataclass(frozen=True)
class CheckpointQuantization:
    """How a checkpoint's linears are stored.

    ``encoding``: the host pool's source encoding (csrc/expert_files.h): "float", "fp8-block128", "gptq",
    "gptq-v2", "gpt-oss-float" or "gpt-oss-mxfp4". ``suffixes``: the tensor names of one linear under its
    prefix (``stacked``: of one layer's experts under its ``experts.`` prefix), in the order the pool reads
    them. ``expert_format``: the expert format those experts are in, unconverted.
    """

    encoding: str = "float"
    suffixes: tuple[str, ...] = ("weight",)
    expert_format: str = "float"
    group_size: int = 0
    stacked: bool = False

    @property
    def quantized(self) -> bool:
        """Whether the experts are stored quantized (any other expert format would be a lossy conversion)."""
        return self.expert_format != "float"

    @property
    def dense_quantized(self) -> bool:
        """Whether dense linears are quantized too (dequantized at load); gpt-oss quantizes its experts only."""
        return self.quantized and not self.stacked


def read_quantization(config, *, stacked_experts: bool = False) -> CheckpointQuantization:
    """The checkpoint's quantization from its config, or a clear error for one moerun does not read.
    ``stacked_experts``: the architecture stores a layer's experts stacked (gpt-oss)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        if stacked_experts:
            return CheckpointQuantization("gpt-oss-float", GPT_OSS_FLOAT_TENSORS, stacked=True)
        return CheckpointQuantization()
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if hasattr(qc, "to_dict") else vars(qc))
    method = str(qc.get("quant_method", "")).lower()
    if stacked_experts:
        if method != "mxfp4":
            raise ExpertFormatError(f"quantization_config.quant_method {method!r}: moerun reads this architecture's "
                                    "stacked experts in float or as published in MXFP4 (quant_method 'mxfp4')")
        return CheckpointQuantization("gpt-oss-mxfp4", GPT_OSS_MXFP4_TENSORS, "mxfp4", MXFP4_BLOCK, stacked=True)
    if method == "mxfp4":
        raise ExpertFormatError("quantization_config.quant_method 'mxfp4' is the gpt-oss layout (stacked experts); "
                                f"moerun reads it for gpt_oss, not {getattr(config, 'model_type', '?')!r}")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if list(block or []) != [128, 128]:
            raise ExpertFormatError(f"quantization_config.weight_block_size is {block!r}; moerun reads fp8 "
                                    "checkpoints with 128x128 block scales (DeepSeek-V3 / Qwen3 FP8)")
        if str(qc.get("fmt", "e4m3")).lower() != "e4m3":
            raise ExpertFormatError(f"quantization_config.fmt is {qc.get('fmt')!r}; moerun reads float8 e4m3 only")
        if str(qc.get("activation_scheme", "dynamic")).lower() != "dynamic":
            raise ExpertFormatError("quantization_config.activation_scheme must be 'dynamic' (static activation "
                                    "scales are not read)")
        return CheckpointQuantization("fp8-block128", ("weight", "weight_scale_inv"), "fp8-block128", 128)
    if method == "gptq":
        bits, group, desc_act = qc.get("bits"), qc.get("group_size"), qc.get("desc_act", False)
        if bits != 4:
            raise ExpertFormatError(f"quantization_config.bits is {bits!r}; moerun reads 4-bit GPTQ checkpoints")
        if group not in GPTQ_GROUPS:
            raise ExpertFormatError(f"quantization_config.group_size is {group!r}; moerun reads GPTQ groups of "
                                    f"{', '.join(map(str, GPTQ_GROUPS))} inputs")
        if desc_act:
            raise ExpertFormatError("quantization_config.desc_act is true (act-order GPTQ); moerun reads GPTQ "
                                    "checkpoints quantized with desc_act false")
        version = str(qc.get("checkpoint_format", "gptq")).lower()
        if version not in ("gptq", "gptq_v2"):
            raise ExpertFormatError(f"quantization_config.checkpoint_format {version!r}: gptq or gptq_v2")
        encoding = "gptq" if version == "gptq" else "gptq-v2"
        return CheckpointQuantization(encoding, ("qweight", "qzeros", "scales"), f"int4-g{group}", group)
    raise ExpertFormatError(f"quantization_config.quant_method {method!r} is not read by moerun; it reads fp8 "
                            "(128x128 blocks) and 4-bit GPTQ checkpoints, or float ones quantized at load "
                            "(expert_format=...)")


def resolve_expert_format(requested: str, quant: CheckpointQuantization, dtype: torch.dtype,
                          scale_dtypes: Iterable[torch.dtype] = ()) -> str:
    """The expert format the host pool and the arena use: ``requested`` ("auto", an alias, or a name of
    moerun.native.EXPERT_FORMATS) against the checkpoint's own format and the compute dtype. A packed
    checkpoint's experts go into float slots only where that is exact (:data:`EXACT_FLOAT_DECODES`);
    ``scale_dtypes``: the dtypes of its experts' fp8 block scales (``weight_scale_inv``), on which that
    depends for fp8-block128."""
    from .native import EXPERT_FORMATS

    if not isinstance(requested, str):
        raise ExpertFormatError(f"expert_format must be a string, not {requested!r}")
    names = ", ".join(("auto", *FLOAT_ALIASES, *FORMAT_ALIASES, *EXPERT_FORMATS))
    name = requested.strip().lower()
    if name == "auto":
        return quant.expert_format
    if name in FLOAT_ALIASES:
        if FLOAT_ALIASES[name] != dtype:
            raise ExpertFormatError(f"expert_format={requested!r} keeps experts in the compute dtype, which is "
                                    f"{dtype}; pass dtype={FLOAT_ALIASES[name]} too, or expert_format='float'")
        name = "float"
    name = FORMAT_ALIASES.get(name, name)
    if name not in EXPERT_FORMATS:
        raise ExpertFormatError(f"unknown expert_format {requested!r}; use one of {names}")
    if quant.quantized and name == "float":
        _check_float_decode(quant, dtype, frozenset(scale_dtypes))
    elif quant.quantized and name != quant.expert_format:
        exact = EXACT_FLOAT_DECODES[quant.encoding][0]
        raise ExpertFormatError(
            f"this checkpoint's experts are {quant.expert_format} ({quant.encoding}); converting them to {name} "
            f"would not be exact. Load with expert_format='auto' (or {quant.expert_format!r}), or 'float' with "
            f"dtype={' or '.join(map(str, exact))} (an exact decode), or quantize a float checkpoint at load")
    return name


def _check_float_decode(quant: CheckpointQuantization, dtype: torch.dtype, scale_dtypes: frozenset) -> None:
    """Packed experts decode exactly into float slots of ``dtype``, or an ExpertFormatError says why not and
    what to load instead."""
    head = f"this checkpoint's experts are {quant.expert_format} ({quant.encoding}); decoding them into {dtype}"
    if quant.encoding == "fp8-block128" and scale_dtypes != {torch.bfloat16}:
        found = ", ".join(sorted(str(d) for d in scale_dtypes)) or "unknown"
        raise ExpertFormatError(
            f"{head} would not be exact: their weight_scale_inv is {found}, and e4m3 (4 significant bits) times an "
            "fp32 scale (24) needs up to 28 significant bits, more than any float dtype holds (BF16 scales would "
            "decode exactly into torch.float32). Load with expert_format='auto' (fp8-block128)")
    exact, why = EXACT_FLOAT_DECODES[quant.encoding]
    if dtype not in exact:
        raise ExpertFormatError(
            f"{head} would not be exact: {why}. They decode exactly into {' or '.join(map(str, exact))}: pass "
            f"dtype={exact[0]} with expert_format='float', or load with expert_format='auto' "
            f"({quant.expert_format})")


def expert_tensor_keys(prefixes: Iterable[str], quant: CheckpointQuantization) -> list[str]:
    """Keys of gate, up, down (``prefixes``: each projection's key without its last part), in the order
    the host pool's source encoding reads them."""
    return [f"{prefix}{suffix}" for prefix in prefixes for suffix in quant.suffixes]


def check_expert_tensors(ckpt: Checkpoint, prefixes: list[str], shapes: list[tuple[int, int]],
                         quant: CheckpointQuantization) -> None:
    """Every tensor of one expert is present with the dtype and shape its encoding implies (out x in per
    projection), checked from the headers before anything large is allocated."""
    for prefix, (rows, cols) in zip(prefixes, shapes):
        for suffix, (dtypes, shape) in zip(quant.suffixes, _expected(quant, rows, cols)):
            _check_tensor(ckpt, prefix + suffix, dtypes, shape, quant, f"of a [{rows}, {cols}] weight")


def check_stacked_expert_tensors(ckpt: Checkpoint, prefix: str, num_experts: int, hidden: int, inter: int,
                                 quant: CheckpointQuantization) -> None:
    """One layer's stacked expert tensors (under ``prefix``) are present with the dtypes and shapes the encoding
    implies for ``num_experts`` experts of ``hidden`` x ``inter``, checked from the headers before anything
    large is allocated."""
    E, H, I = num_experts, hidden, inter
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if quant.encoding == "gpt-oss-float":
        expected = {"gate_up_proj": (floats, (E, H, 2 * I)), "gate_up_proj_bias": (floats, (E, 2 * I)),
                    "down_proj": (floats, (E, I, H)), "down_proj_bias": (floats, (E, H))}
    else:
        if H % MXFP4_BLOCK or I % MXFP4_BLOCK:
            raise CheckpointError(f"{ckpt.path}: hidden {H} and expert width {I} must be multiples of {MXFP4_BLOCK} "
                                  "for MXFP4 experts")
        u8, g = (torch.uint8,), MXFP4_BLOCK
        expected = {"gate_up_proj_blocks": (u8, (E, 2 * I, H // g, g // 2)), "gate_up_proj_scales": (u8, (E, 2 * I, H // g)),
                    "gate_up_proj_bias": (floats, (E, 2 * I)),
                    "down_proj_blocks": (u8, (E, H, I // g, g // 2)), "down_proj_scales": (u8, (E, H, I // g)),
                    "down_proj_bias": (floats, (E, H))}
    for suffix in quant.suffixes:
        dtypes, shape = expected[suffix]
        _check_tensor(ckpt, prefix + suffix, dtypes, shape, quant, f"for {E} experts of hidden {H}, width {I}")
    if quant.encoding == "gpt-oss-float":
        # An expert's weights are read in one dtype (csrc/expert_files.cpp); biases are converted apart.
        gate_up, down = ckpt.tensors[prefix + "gate_up_proj"], ckpt.tensors[prefix + "down_proj"]
        if down.dtype != gate_up.dtype:
            raise CheckpointError(f"{down.file}: {prefix}down_proj is {down.dtype}, expected {gate_up.dtype} as "
                                  f"{prefix}gate_up_proj: gpt-oss experts are read with one weight dtype; save the "
                                  "layer's two weights in one dtype")


def _check_tensor(ckpt: Checkpoint, key: str, dtypes: tuple[torch.dtype, ...], shape: tuple,
                  quant: CheckpointQuantization, what: str) -> None:
    """Routed expert tensor ``key`` is present with one of ``dtypes`` and ``shape`` (``what``: the weight it
    encodes, for the message)."""
    info = ckpt.tensors.get(key)
    if info is None:
        raise CheckpointError(f"{ckpt.path}: routed expert tensor {key} is missing; the checkpoint does not match "
                              f"its config ({quant.encoding} experts)")
    if info.shape != shape:
        raise CheckpointError(f"{info.file}: {key} has shape {list(info.shape)}, expected {list(shape)} "
                              f"({quant.encoding} {what})")
    if info.dtype not in dtypes:
        raise CheckpointError(f"{info.file}: {key} is {info.dtype}; {quant.encoding} experts need "
                              f"{' or '.join(str(d) for d in dtypes)}")


def _expected(quant: CheckpointQuantization, rows: int, cols: int) -> list[tuple[tuple[torch.dtype, ...], tuple]]:
    if quant.encoding == "float":
        return [((torch.float32, torch.float16, torch.bfloat16), (rows, cols))]
    if quant.encoding == "fp8-block128":
        edge = quant.group_size
        return [((torch.float8_e4m3fn,), (rows, cols)),
                ((torch.float32, torch.bfloat16), (-(-rows // edge), -(-cols // edge)))]
    g = quant.group_size
    if cols % g or rows % 8:
        raise CheckpointError(f"a [{rows}, {cols}] weight cannot be GPTQ with group {g}: inputs must be a multiple "
                              "of the group and outputs of 8")
    return [((torch.int32,), (cols // 8, rows)), ((torch.int32,), (cols // g, rows // 8)),
            ((torch.float16,), (cols // g, rows))]


# -- dense weights ----------------------------------------------------------------------------------------
def dense_elements(ckpt: Checkpoint, keys: list[str], quant: CheckpointQuantization) -> int:
    """Elements of the dense weights once dequantized (what the skeleton holds on the device)."""
    total = 0
    for key in keys:
        info = ckpt.tensors[key]
        numel = max(1, info.nbytes // info.dtype.itemsize)
        if quant.encoding == "fp8-block128" and key.endswith(".weight_scale_inv"):
            continue
        if quant.encoding in ("gptq", "gptq-v2"):
            if key.endswith((".qzeros", ".scales", ".g_idx")):
                continue
            if key.endswith(".qweight"):
                numel *= 8
        total += numel
    return total


def read_dense(ckpt: Checkpoint, keys: list[str], quant: CheckpointQuantization,
               device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of the dense weights, quantized linears dequantized to fp32 under their ``.weight``
    key (the compute dtype is the caller's to apply). A float checkpoint's tensors pass through."""
    if not quant.dense_quantized:
        yield from ckpt.read(keys, device)
        return
    companions = (".weight_scale_inv",) if quant.encoding == "fp8-block128" else (".qzeros", ".scales", ".g_idx")
    held: dict[str, dict[str, torch.Tensor]] = {}
    main = ".weight" if quant.encoding == "fp8-block128" else ".qweight"
    quantized_prefixes = {k[: -len(main)] for k in keys if k.endswith(main)
                          and (quant.encoding != "fp8-block128" or k[: -len(main)] + ".weight_scale_inv" in ckpt.tensors)}
    for key, tensor in ckpt.read(keys, device):
        suffix = next((s for s in (main, *companions) if key.endswith(s)), None)
        prefix = key[: -len(suffix)] if suffix else None
        if prefix is None or prefix not in quantized_prefixes:
            yield key, tensor
            continue
        parts = held.setdefault(prefix, {})
        parts[suffix] = tensor
        if all(s in parts for s in (main, *companions) if s != ".g_idx" or prefix + ".g_idx" in ckpt.tensors):
            del held[prefix]
            yield prefix + ".weight", _dequantize(quant, prefix, parts)
    if held:
        prefix = next(iter(held))
        raise CheckpointError(f"{ckpt.path}: the quantized linear {prefix} lacks "
                              f"{', '.join(s for s in (main, *companions) if s not in held[prefix] and s != '.g_idx')}")


def _dequantize(quant: CheckpointQuantization, prefix: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if quant.encoding == "fp8-block128":
        w, s = parts[".weight"], parts[".weight_scale_inv"].float()
        rows, cols = w.shape
        edge = quant.group_size
        scale = s.repeat_interleave(edge, 0)[:rows].repeat_interleave(edge, 1)[:, :cols]
        return w.float() * scale
    qweight, qzeros, scales = parts[".qweight"], parts[".qzeros"], parts[".scales"]
    g = quant.group_size
    in8, out = qweight.shape
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF).reshape(in8 * 8, out)           # [in, out]
    z = ((qzeros.unsqueeze(2) >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], out)     # [in/g, out]
    if quant.encoding == "gptq":
        z = z + 1  # GPTQ v1 stores zero points minus one
    g_idx = parts.get(".g_idx")
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(in8 * 8) // g):
        raise CheckpointError(f"{prefix}.g_idx is not in group order (act-order GPTQ); moerun reads desc_act false")
    groups = torch.arange(in8 * 8, device=qweight.device) // g
    w = (q - z[groups]).float() * scales.float()[groups]                                          # [in, out]
    return w.t().contiguous()
