"""A packed checkpoint loaded in another expert format: decoded into float slots where that is exact, refused
(with the reason and the formats it does convert to) before anything large is allocated where it is not; and
a stacked float checkpoint whose layer mixes weight dtypes refused before the host pool exists.

Exact: MXFP4 into fp32 and bf16, GPTQ int4 into fp32, fp8-block128 with BF16 scales into fp32
(moerun.checkpoint_quantization.EXACT_FLOAT_DECODES). The float slots hold, bit for bit, what the packed
slots decode to (moerun.native.decode_expert), so the float-loaded model generates the packed-loaded model's
tokens, which are transformers' on the dequantized checkpoint (MXFP4: Mxfp4Config(dequantize=True); GPTQ: a
float checkpoint of the experts unpacked here from the GPTQ layout).
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mxfp4Config

import moerun
import moerun.loader
import moerun.native
from moerun.checkpoint import CheckpointError
from moerun.checkpoint_quantization import ExpertFormatError
from moerun.models.synthetic import build_checkpoint, build_packed_checkpoint, synthetic_config
from moerun.native import decode_expert, slot_parts, slot_views

NEW_TOKENS = 6
PROMPT = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """{format: checkpoint}: gpt-oss in the hub's MXFP4, qwen3_moe as GPTQ v1 (group 32) and as FP8 (F32
    block scales), dense weights in fp32."""
    def build(arch, fmt):
        return build_packed_checkpoint(synthetic_config(arch), tmp_path_factory.mktemp(fmt), expert_format=fmt,
                                       dtype=torch.float32, seed=3)
    return {"mxfp4": build("gpt_oss", "mxfp4"), "int4-g32": build("qwen3_moe", "int4-g32"),
            "fp8-block128": build("qwen3_moe", "fp8-block128")}


@pytest.fixture(scope="module")
def fp8_bf16_scales(packed, tmp_path_factory):
    """The fp8-block128 checkpoint with its weight_scale_inv in BF16 (decodes exactly into fp32 only)."""
    import shutil

    path = shutil.copytree(packed["fp8-block128"], tmp_path_factory.mktemp("fp8") / "fp8-bf16-scales")
    for shard in path.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({k: v.bfloat16() if k.endswith("weight_scale_inv") else v for k, v in tensors.items()},
                  str(shard), metadata={"format": "pt"})
    return path


def _load(path, **kw):
    return moerun.load(path, device="cpu", max_context=64, progress=False, **kw)


def _greedy(model):
    return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)


def _assert_float_slots_hold_the_decode(packed_model, float_model, dtype):
    """Every float slot's weights are the packed slot's decode, and its biases the packed slot's, exactly."""
    pp, pf = packed_model.moerun.runtime.pool, float_model.moerun.runtime.pool
    assert pf.layout.format == "float" and pf.dtype == dtype and pp.layout.format != "float"
    for layer in range(pp.num_layers):
        for expert in range(pp.num_experts):
            gate_up, down = decode_expert(pp.layout, pp.view(layer, expert))       # fp32 [2I, H], [H, I]
            f_gate_up, f_down = slot_views(pf.layout, pf.view(layer, expert))
            assert torch.equal(f_gate_up.float(), gate_up) and torch.equal(f_down.float(), down), (layer, expert)
            p_parts, f_parts = slot_parts(pp.layout, pp.view(layer, expert)), slot_parts(pf.layout, pf.view(layer, expert))
            for bias in ("gate_up_bias", "down_bias"):
                assert torch.equal(p_parts.get(bias, torch.empty(0)), f_parts.get(bias, torch.empty(0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_experts_decode_exactly_into_float_slots(packed, dtype):
    path = packed["mxfp4"]
    as_packed, as_float = _load(path, dtype=dtype), _load(path, dtype=dtype, expert_format="float")
    assert as_float.moerun.model_info["expert_format"] == "float"
    assert as_float.moerun.model_info["checkpoint_quantization"] == "gpt-oss-mxfp4"
    _assert_float_slots_hold_the_decode(as_packed, as_float, dtype)
    if dtype == torch.float32:  # transformers 5.x dequantizes to bf16, exact values: its fp32 copy is the same
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         quantization_config=Mxfp4Config(dequantize=True)).float()
        want = _greedy(reference)
        assert torch.equal(_greedy(as_packed), want) and torch.equal(_greedy(as_float), want)


def _gptq_weight(qweight, qzeros, scales, group):
    """[out, in] fp32 of one GPTQ v1 linear: qweight I32 [in/8, out] (eight 4-bit inputs, lowest first), qzeros
    I32 [in/G, out/8] (zero - 1), scales F16 [in/G, out]; w = (q - zero) * scale."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])       # [in, out]
    zero = ((qzeros[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1) + 1  # [in/G, out]
    rows = torch.arange(q.shape[0]) // group
    return ((q - zero[rows]).double() * scales.double()[rows]).float().t().contiguous()


def _dequantized_gptq_twin(src, dst):
    """A float checkpoint (one file, no quantization_config) of ``src`` with every GPTQ linear unpacked."""
    group = json.loads((src / "config.json").read_text())["quantization_config"]["group_size"]
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    out = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        prefix = key[: -len("qweight")]
        out[prefix + "weight"] = _gptq_weight(tensors[key], tensors[prefix + "qzeros"], tensors[prefix + "scales"],
                                              group)
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_gptq_experts_decode_exactly_into_float32_slots(packed, tmp_path):
    path = packed["int4-g32"]
    as_packed = _load(path, dtype=torch.float32)
    as_float = _load(path, dtype=torch.float32, expert_format="fp32")
    assert as_packed.moerun.model_info["expert_format"] == "int4-g32"
    _assert_float_slots_hold_the_decode(as_packed, as_float, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(_dequantized_gptq_twin(path, tmp_path / "deq"),
                                                     dtype=torch.float32)
    want = _greedy(reference)
    assert torch.equal(_greedy(as_packed), want) and torch.equal(_greedy(as_float), want)


def test_fp8_experts_with_bf16_scales_decode_exactly_into_float32_slots(fp8_bf16_scales):
    path = fp8_bf16_scales
    as_packed = _load(path, dtype=torch.float32)
    as_float = _load(path, dtype=torch.float32, expert_format="float")
    _assert_float_slots_hold_the_decode(as_packed, as_float, torch.float32)
    assert torch.equal(_greedy(as_float), _greedy(as_packed))


@pytest.fixture
def no_large_allocation(monkeypatch):
    """Fails the test if load() gets as far as the skeleton, the host pool or the arena."""
    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was allocated before the error")
        return fail
    monkeypatch.setattr(moerun.native, "HostPool", refuse("the host pool"))
    monkeypatch.setattr(moerun.native, "ExpertArena", refuse("the arena"))
    monkeypatch.setattr(moerun.loader, "_build_skeleton", refuse("the model skeleton"))


@pytest.mark.parametrize("fmt, kw, match", [
    ("mxfp4", dict(dtype=torch.float16, expert_format="float"),
     r"decoding them into torch.float16 would not be exact: .* not float16's range\. They decode exactly into "
     r"torch.float32 or torch.bfloat16"),
    ("int4-g32", dict(dtype=torch.bfloat16, expert_format="bf16"),
     r"int4-g32 \(gptq\); decoding them into torch.bfloat16 would not be exact: \(q - zero\) .* up to 16 significant "
     r"bits.*decode exactly into torch.float32: pass dtype=torch.float32 with expert_format='float'"),
    ("int4-g32", dict(dtype=torch.float16, expert_format="float"), r"into torch.float16 would not be exact"),
    ("fp8-block128", dict(dtype=torch.float32, expert_format="float"),
     r"weight_scale_inv is torch.float32, and e4m3 .* up to 28 significant bits.*expert_format='auto'"),
    ("mxfp4", dict(dtype=torch.float32, expert_format="int4-g32"),
     r"mxfp4 \(gpt-oss-mxfp4\); converting them to int4-g32 would not be exact.*'float' with "
     r"dtype=torch.float32 or torch.bfloat16"),
    ("int4-g32", dict(dtype=torch.float32, expert_format="int4-g64"),
     r"converting them to int4-g64 would not be exact.*'float' with dtype=torch.float32 \(an exact decode\)"),
])
def test_an_inexact_conversion_is_refused_before_any_large_allocation(packed, no_large_allocation, fmt, kw, match):
    with pytest.raises(ExpertFormatError, match=match):
        _load(packed[fmt], **kw)
    with pytest.raises(ExpertFormatError, match=match):  # the plan refuses it the same way
        moerun.memory_plan(packed[fmt], device="cpu", max_context=64, **kw)


def test_fp8_experts_with_bf16_scales_are_refused_in_bfloat16_before_any_large_allocation(fp8_bf16_scales,
                                                                                          no_large_allocation):
    # e4m3 times a BF16 scale needs up to 12 significant bits; bfloat16 holds 8.
    kw = dict(dtype=torch.bfloat16, expert_format="float")
    match = (r"fp8-block128 \(fp8-block128\); decoding them into torch.bfloat16 would not be exact: .* up to 12 "
             r"significant bits.*decode exactly into torch.float32")
    with pytest.raises(ExpertFormatError, match=match):
        _load(fp8_bf16_scales, **kw)
    with pytest.raises(ExpertFormatError, match=match):
        moerun.memory_plan(fp8_bf16_scales, device="cpu", max_context=64, **kw)


def test_the_host_pool_itself_refuses_an_inexact_decode(packed, fp8_bf16_scales):
    """The native reader admits the same conversions as the loader (a caller that skips its checks)."""
    from moerun.models import adapter_for
    from transformers import AutoConfig

    paths = dict(packed, **{"fp8-bf16-scales": fp8_bf16_scales})

    def sources(fmt, layer=0):
        path = paths[fmt]
        adapter = adapter_for(AutoConfig.from_pretrained(path))
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        if adapter.stacked_experts:
            prefix = adapter.stacked_expert_prefix(adapter.moe_layers()[layer])
            names = ["gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks",
                     "down_proj_scales", "down_proj_bias"]
            return adapter, [(0, 0, [(str(path / index[prefix + n]), prefix + n) for n in names])]
        keys = adapter.expert_keys(adapter.moe_layers()[layer], 0)
        parts = ("qweight", "qzeros", "scales") if fmt == "int4-g32" else ("weight", "weight_scale_inv")
        tensors = [k[: -len("weight")] + p for k in (keys.gate, keys.up, keys.down) for p in parts]
        return adapter, [(0, 0, [(str(path / index[t]), t) for t in tensors])]

    for fmt, encoding, dtype, match in [("mxfp4", "gpt-oss-mxfp4", torch.float16, "cannot be decoded into float16"),
                                        ("int4-g32", "gptq", torch.bfloat16, "cannot be decoded into bfloat16"),
                                        ("fp8-block128", "fp8-block128", torch.float32, "is F32: e4m3 times an F32"),
                                        ("fp8-bf16-scales", "fp8-block128", torch.bfloat16,
                                         "cannot be decoded into bfloat16")]:
        adapter, spec = sources(fmt)
        pool = moerun.native.HostPool(1, adapter.num_experts, adapter.hidden_size, adapter.expert_inter_size, dtype,
                                      pinned=False, bias=adapter.expert_activation.bias)
        with pytest.raises(ValueError, match=match):
            pool.fill(spec, encoding=encoding)


def test_a_stacked_float_layer_mixing_weight_dtypes_fails_before_the_host_pool(tmp_path, no_large_allocation):
    """gpt-oss's bf16 layout with the last layer's down_proj in F32: a CheckpointError naming the tensor, its
    dtype and the expected one, from the headers, before the skeleton, the host pool or the arena exist."""
    path = build_checkpoint(synthetic_config("gpt_oss"), tmp_path / "gpt-oss-bf16", dtype=torch.bfloat16, seed=2)
    tensors = load_file(str(path / "model.safetensors"))
    key = "model.layers.3.mlp.experts.down_proj"
    tensors[key] = tensors[key].float()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    match = (r"model\.layers\.3\.mlp\.experts\.down_proj is torch\.float32, expected torch\.bfloat16 as "
             r"model\.layers\.3\.mlp\.experts\.gate_up_proj")
    with pytest.raises(CheckpointError, match=match):
        _load(path)
    with pytest.raises(CheckpointError, match=match):
        moerun.memory_plan(path, device="cpu", max_context=64)
