"""Built-in checkpoints generated with packed experts (fp8 block-scaled, GPTQ int4) load in moerun as
published, and generate what plain transformers generates on the same weights (fp32 compute): the same
greedy tokens, logits within 1e-4 (generation_helpers.assert_matches).

fp8: transformers dequantizes the checkpoint itself (``FineGrainedFP8Config(dequantize=True)``), for every
architecture with per-expert linears, with fp32 and with BF16 ``weight_scale_inv``. GPTQ: transformers
needs a GPTQ backend that CPU CI lacks, so the reference is a float twin dequantized here from the
published definition of the layout, not with moerun's code. gpt-oss's stacked MXFP4 layout runs against
transformers' own ``Mxfp4Config(dequantize=True)`` in tests/runtime/test_gpt_oss.py.
"""
import json

import pytest
import torch
from generation_helpers import NEW_TOKENS, assert_matches, greedy
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

import moerun
from moerun.models import adapter_for
from moerun.models.synthetic import (
    PACKED_FORMATS, SUPPORTED_ARCHS, build_checkpoint, build_packed_checkpoint, packed_expert_bytes,
    quantization_config, synthetic_config,
)

PROMPT = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(4))
GPTQ_CASES = [("qwen3_moe", "int4-g32"), ("qwen2_moe", "int4-g32")]
# Layouts published per expert linear; mxfp4 is published for stacked experts only (gpt-oss: its layout
# is tested in tests/runtime/test_gpt_oss.py and tests/native/test_gpt_oss_experts.py).
PER_LINEAR_FORMATS = tuple(f for f in PACKED_FORMATS if f != "mxfp4")
PER_EXPERT_ARCHS = [a for a in SUPPORTED_ARCHS if not adapter_for(synthetic_config(a)).stacked_experts]
EVICTING = "policy p { cache { eviction = lru } schedule { mode = gpu_only } }"


def _tensors(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def _dequantize_fp8(weight, scale_inv):
    """F8_E4M3 [out, in] times its fp32 scale per 128x128 block."""
    rows, cols = weight.shape
    scale = scale_inv.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return weight.float() * scale


def _dequantize_gptq(qweight, qzeros, scales, group):
    """GPTQ v1: w[o, i] = (q[i, o] - (z[i / g, o] + 1)) * s[i / g, o], 4-bit fields lowest first."""
    cols, rows = qweight.shape[0] * 8, qweight.shape[1]
    q = torch.stack([(qweight >> (4 * k)) & 0xF for k in range(8)], dim=1).reshape(cols, rows)
    z = torch.stack([(qzeros >> (4 * k)) & 0xF for k in range(8)], dim=2).reshape(qzeros.shape[0], rows) + 1
    g = torch.arange(cols) // group
    return ((q - z[g]).float() * scales.float()[g]).t().contiguous()


def _gptq_twin(path, out):
    """A float checkpoint with the same weights: GPTQ experts dequantized, no quantization_config."""
    tensors = _tensors(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.pop("quantization_config")
    twin = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            prefix = key[: -len("qweight")]
            twin[prefix + "weight"] = _dequantize_gptq(value, tensors[prefix + "qzeros"], tensors[prefix + "scales"],
                                                       qc["group_size"])
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            twin[key] = value
    out.mkdir()
    save_file(twin, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text((path / "generation_config.json").read_text())
    return out


def _load_evicting(path, **kw):
    """moerun's fp32 model of ``path`` with 3 expert slots: every step evicts."""
    plan = moerun.memory_plan(path, device="cpu", dtype=torch.float32, max_context=64)
    return moerun.load(path, device="cpu", dtype=torch.float32, max_context=64, progress=False, policy=EVICTING,
                       vram_budget=plan.fixed_bytes + 3 * plan.slot_bytes, **kw)


@pytest.mark.parametrize("arch, fmt", GPTQ_CASES)
def test_gptq_checkpoint_generates_what_transformers_does_on_its_dequantized_twin(tmp_path, arch, fmt):
    config = synthetic_config(arch)
    path = build_checkpoint(config, tmp_path / "packed", seed=7, dtype=torch.bfloat16, expert_format=fmt)
    want = greedy(AutoModelForCausalLM.from_pretrained(_gptq_twin(path, tmp_path / "twin"), dtype=torch.float32), PROMPT, every_step=True)
    model = _load_evicting(path)
    experts = model.moerun.memory()["experts"]
    assert experts["format"] == fmt and experts["checkpoint_quantization"] == "gptq"
    assert_matches(greedy(model, PROMPT, every_step=True), want)


@pytest.mark.parametrize("arch, scale_dtype", [pytest.param(a, torch.float32, id=a) for a in PER_EXPERT_ARCHS]
                         + [pytest.param("qwen3_moe", torch.bfloat16, id="qwen3_moe-bf16_scales")])
def test_fp8_checkpoint_generates_what_transformers_dequantizing_it_does(tmp_path, arch, scale_dtype):
    path = build_packed_checkpoint(synthetic_config(arch), tmp_path / "fp8", expert_format="fp8-block128", seed=7,
                                   fp8_scale_dtype=scale_dtype)
    scales = [t for k, t in _tensors(path).items() if k.endswith("weight_scale_inv")]
    assert scales and all(t.dtype == scale_dtype for t in scales)
    # transformers 5.17 leaves mixtral's router in the checkpoint's bf16: .float() widens it exactly.
    want = greedy(AutoModelForCausalLM.from_pretrained(
        path, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=torch.float32).float(), PROMPT, every_step=True)
    model = _load_evicting(path, fast_decode=True)
    experts = model.moerun.memory()["experts"]
    assert experts["format"] == experts["checkpoint_quantization"] == "fp8-block128"
    assert_matches(greedy(model, PROMPT, every_step=True), want)
    assert model.moerun.stats()["decode"]["fast_steps"] == NEW_TOKENS - 1
    model.moerun.fast_decode = False
    assert_matches(greedy(model, PROMPT, every_step=True), want)


@pytest.mark.parametrize("fmt", PER_LINEAR_FORMATS)
def test_packed_layout_is_the_published_one_written_in_shards(tmp_path, fmt):
    config = synthetic_config("qwen2_moe", hidden_size=128, moe_intermediate_size=128)
    adapter = adapter_for(config)
    per_expert = packed_expert_bytes(config, fmt)
    path = build_packed_checkpoint(config, tmp_path / fmt, expert_format=fmt, seed=1, max_shard_bytes=5 * per_expert)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    experts = adapter.num_experts * len(adapter.moe_layers())
    assert len(shards) == 1 + -(-experts // 5) and all(f"-of-{len(shards):05d}" in s for s in shards)
    assert json.loads((path / "config.json").read_text())["quantization_config"] == quantization_config(fmt)
    tensors = _tensors(path)
    keys = adapter.expert_keys(1, 3)
    H, I = adapter.hidden_size, adapter.expert_inter_size
    if fmt == "fp8-block128":
        w, s = tensors[keys.down], tensors[keys.down + "_scale_inv"]
        assert w.dtype == torch.float8_e4m3fn and w.shape == (H, I) and s.shape == (1, 1) and s.dtype == torch.float32
        assert not torch.isnan(w.float()).any()
        value = _dequantize_fp8(w, s)
    else:
        group, prefix = int(fmt.rsplit("-g", 1)[1]), keys.down[: -len("weight")]
        q, z, s = tensors[prefix + "qweight"], tensors[prefix + "qzeros"], tensors[prefix + "scales"]
        assert (q.shape, z.shape, s.shape) == ((I // 8, H), (I // group, H // 8), (I // group, H))
        assert (q.dtype, z.dtype, s.dtype) == (torch.int32, torch.int32, torch.float16)
        assert torch.equal(tensors[prefix + "g_idx"], torch.arange(I, dtype=torch.int32) // group)
        value = _dequantize_gptq(q, z, s, group)
    assert 0.5 < value.std().item() * I ** 0.5 < 2.0  # the float builder's std of 1/sqrt(fan_in)
    expert_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if adapter.is_routed_expert_key(k))
    assert expert_bytes == experts * per_expert
    dense = [k for k in tensors if not adapter.is_routed_expert_key(k)]
    assert all(tensors[k].dtype == torch.bfloat16 for k in dense)  # the dense dtype's default


def test_unpackable_shapes_and_unknown_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\[32, 64\] linear cannot be int4-g128 .* inputs \(64\) must be a multiple "
                                         r"of the group \(128\)"):
        build_packed_checkpoint(synthetic_config("qwen2_moe"), tmp_path / "a", expert_format="int4")
    with pytest.raises(ValueError, match="no published checkpoint layout for expert format 'int8'"):
        build_packed_checkpoint(synthetic_config("qwen2_moe"), tmp_path / "b", expert_format="int8")
    with pytest.raises(ValueError, match="fp8_scale_dtype applies to fp8-block128 checkpoints only, not int4-g32"):
        build_packed_checkpoint(synthetic_config("qwen2_moe"), tmp_path / "c", expert_format="int4-g32",
                                fp8_scale_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp8_scale_dtype torch.float16 is not one fp8 checkpoints publish"):
        build_packed_checkpoint(synthetic_config("qwen2_moe"), tmp_path / "d", expert_format="fp8-block128",
                                fp8_scale_dtype=torch.float16)
