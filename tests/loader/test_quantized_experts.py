"""Quantized experts end to end on the CPU: a float checkpoint quantized at load, and checkpoints published
quantized (fp8 with 128x128 block scales, 4-bit GPTQ) read in their own format, generate exactly what plain
transformers generates on a checkpoint whose weights are the dequantized values (fp32 compute): the same
greedy tokens, logits within 1e-4 (generation_helpers.assert_matches).

The dequantized values come from transformers itself where it can dequantize the format (fp8:
``FineGrainedFP8Config(dequantize=True)``), else from tests/expert_format_reference.py (written from the
formats' definitions, not from moerun's code) and, for GPTQ, from the GPTQ packing written out here.
Every format at load runs under the hybrid schedule on both decode paths, and the bundled policies run on
one format of each family (fp8, int8, int4, mxfp4).
"""
import functools
import json
import shutil
from importlib import resources

import pytest
import torch
from generation_helpers import NEW_TOKENS, assert_matches, greedy
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.generation.streamers import BaseStreamer

import expert_format_reference as ref
import moerun
from moerun.checkpoint import CheckpointError
from moerun.checkpoint_quantization import ExpertFormatError
from moerun.models import adapter_for
from moerun.models.synthetic import SUPPORTED_ARCHS, build_checkpoint, synthetic_config
from moerun.native import EXPERT_FORMATS, slot_layout

QUANTIZED = [f for f in EXPERT_FORMATS if f != "float"]
POLICIES = {
    "evicting": "policy p { cache { eviction = lru } schedule { mode = gpu_only } }",
    "cpu_fallback": "policy p { cache { eviction = lru } schedule { mode = cpu_fallback } }",
}
# The cost model alone copies these tiny experts in decode (a copy is cheap) and leaves the CPU executor only
# the prefill's misses that find no slot. A copy threshold of 1 us, below the cost model's 10 us copy
# latency, sends every decode miss to the CPU executor, beside the kernel of the resident experts: decode
# steps of both paths run both on every format, whatever the measured timings.
HYBRID = "policy p { cache { eviction = lru } schedule { mode = hybrid offload_threshold_ms = 0.001 } }"
BUNDLED_POLICIES = sorted(p.name for p in resources.files("moerun.policies").iterdir() if p.name.endswith(".moe"))
FAMILY_FORMATS = ("fp8-block128", "int8", "int4-g32", "mxfp4")  # one format of each family


def _experts(path, config):
    """{(layer, expert): (prefixes gate, up, down)} of a checkpoint built from ``config``."""
    adapter = adapter_for(config)
    if adapter.stacked_experts:  # gpt-oss: {(layer, None): [the layer's experts prefix]}
        return {(layer, None): [adapter.stacked_expert_prefix(layer)] for layer in adapter.moe_layers()}
    keys = {(layer, e): adapter.expert_keys(layer, e) for layer in adapter.moe_layers() for e in range(adapter.num_experts)}
    return {le: [k[: -len("weight")] for k in (ks.gate, ks.up, ks.down)] for le, ks in keys.items()}


def _rewrite(src, dst, tensors, config_update=None):
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _dequantized_experts(tensors, experts, fmt, dtype=torch.float32):
    """The float tensors with every routed expert replaced by its reference-dequantized values in ``fmt``."""
    out = dict(tensors)
    for prefixes in experts.values():
        if len(prefixes) == 1:  # stacked: gate_up [E, H, 2I] (gate and up interleaved), down [E, I, H], x @ W
            gate_up, down = tensors[prefixes[0] + "gate_up_proj"].clone(), tensors[prefixes[0] + "down_proj"].clone()
            layout = slot_layout(dtype, gate_up.shape[1], down.shape[1], fmt)
            for e in range(gate_up.shape[0]):
                gate, up = gate_up[e][:, 0::2].t(), gate_up[e][:, 1::2].t()
                gu, d = ref.decode(layout, ref.encode(layout, gate, up, down[e].t()))
                i = gate.shape[0]
                gate_up[e][:, 0::2], gate_up[e][:, 1::2], down[e] = gu[:i].t(), gu[i:].t(), d.t()
            out[prefixes[0] + "gate_up_proj"], out[prefixes[0] + "down_proj"] = gate_up, down
            continue
        g, u, d = prefixes
        gate, up, down = tensors[g + "weight"], tensors[u + "weight"], tensors[d + "weight"]
        layout = slot_layout(dtype, gate.shape[1], gate.shape[0], fmt)
        gate_up, down_q = ref.decode(layout, ref.encode(layout, gate, up, down))
        i = gate.shape[0]
        out[g + "weight"], out[u + "weight"], out[d + "weight"] = gate_up[:i].clone(), gate_up[i:].clone(), down_q
    return out


def _load(path, **kw):
    plan = moerun.memory_plan(path, vram_budget=1 << 40, device="cpu", max_context=64,
                              expert_format=kw.get("expert_format", "auto"))
    kw.setdefault("vram_budget", plan.fixed_bytes + 3 * plan.slot_bytes)  # 3 slots: every step evicts
    return moerun.load(path, device="cpu", max_context=64, progress=False, **kw)


def _checkpoint_for(fmt):
    """The float checkpoint ``fmt`` quantizes at load: the tiny shapes' I = 32 takes groups of 32 only."""
    return "wide" if fmt in ("int4-g64", "int4-g128") else "qwen2_moe"


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory):
    built = {arch: build_checkpoint(synthetic_config(arch), tmp_path_factory.mktemp(arch), seed=5)
             for arch in SUPPORTED_ARCHS}
    # H = I = 128: every group size divides both (the tiny shapes' I = 32 takes groups of 32 only).
    built["wide"] = build_checkpoint(synthetic_config("qwen2_moe", hidden_size=128, moe_intermediate_size=128),
                                     tmp_path_factory.mktemp("wide"), seed=5)
    return built


PROMPT = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def references(float_checkpoints, tmp_path_factory):
    """``reference(name, fmt) -> (tokens, logits)``: plain transformers' greedy generation on float checkpoint
    ``name`` with every routed expert replaced by its reference-dequantized ``fmt`` values (once per pair)."""
    @functools.cache
    def reference(name, fmt):
        src = float_checkpoints[name]
        tensors = load_file(str(src / "model.safetensors"))
        deq = _rewrite(src, tmp_path_factory.mktemp(f"deq-{name}-{fmt}") / "ckpt",
                       _dequantized_experts(tensors, _experts(src, synthetic_config_of(src)), fmt))
        return greedy(AutoModelForCausalLM.from_pretrained(deq), PROMPT, every_step=True)
    return reference


def synthetic_config_of(path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_quantized_at_load_generates_what_transformers_does_on_the_dequantized_weights(
        float_checkpoints, references, fmt, policy):
    src = float_checkpoints[_checkpoint_for(fmt)]
    model = _load(src, expert_format=fmt, policy=POLICIES[policy])
    mem = model.moerun.memory()["experts"]
    assert mem["format"] == fmt and mem["checkpoint_quantization"] == "float"
    config = synthetic_config_of(src)
    assert mem["slot_bytes"] == slot_layout(torch.float32, config.hidden_size, config.moe_intermediate_size, fmt).slot_bytes
    assert_matches(greedy(model, PROMPT, every_step=True), references(_checkpoint_for(fmt), fmt))


@pytest.mark.parametrize("arch", [a for a in SUPPORTED_ARCHS if a != "qwen2_moe"])
def test_every_architecture_takes_quantized_experts(float_checkpoints, references, arch):
    model = _load(float_checkpoints[arch], expert_format="int4-g32", policy=POLICIES["evicting"])
    assert_matches(greedy(model, PROMPT, every_step=True), references(arch, "int4-g32"))


class _DecodeCounters(BaseStreamer):
    """Starts the model's counters from zero when the first generated token arrives, so that ``stats()``
    after generate() counts decode steps only (moerun's loop hands a token over one step late, so its first
    decode step goes uncounted too)."""

    def __init__(self, model):
        self.model, self.puts = model, 0

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.model.moerun.reset_stats()

    def end(self):
        pass


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_hybrid_schedule_on_both_decode_paths_generates_what_transformers_does(float_checkpoints, references, fmt):
    name = _checkpoint_for(fmt)
    model = _load(float_checkpoints[name], expert_format=fmt, policy=HYBRID, fast_decode=True)
    want = references(name, fmt)
    for fast in (True, False):
        model.moerun.fast_decode = fast
        fast_steps = model.moerun.stats()["decode"]["fast_steps"]
        assert_matches(greedy(model, PROMPT, every_step=True, streamer=_DecodeCounters(model)), want)
        stats = model.moerun.stats()
        assert stats["decode"]["fast_steps"] - fast_steps == (NEW_TOKENS - 1 if fast else 0)
        assert stats["cpu_share"] > 0 and stats["hits"] > 0  # decode steps: CPU executor and resident kernel


@pytest.mark.parametrize("fmt", FAMILY_FORMATS)
@pytest.mark.parametrize("policy", BUNDLED_POLICIES)
def test_bundled_policies_generate_what_transformers_does(float_checkpoints, references, fmt, policy):
    # 3 slots (every step evicts) and the fast decode path, as a GPU runs by default.
    model = _load(float_checkpoints[_checkpoint_for(fmt)], expert_format=fmt, policy=policy, fast_decode=True)
    assert_matches(greedy(model, PROMPT, every_step=True), references(_checkpoint_for(fmt), fmt))


# -- checkpoints published quantized ---------------------------------------------------------------------
def _fp8_block(w):
    """[R, C] -> (F8_E4M3 weight, fp32 weight_scale_inv [ceil(R/128), ceil(C/128)])."""
    q, s, _ = ref.encode_matrix("fp8-block128", 128, w, w.shape[0])
    return (q.view(torch.float8_e4m3fn).view(w.shape),
            s.view(torch.float32).view(-(-w.shape[0] // 128), -(-w.shape[1] // 128)))


def _fp8_checkpoint(tmp_path, src, dense_too=True):
    """An fp8 checkpoint: every expert and (dense_too) every attention projection in fp8 with block scales,
    as DeepSeek-V3 / Qwen3 FP8 publish them."""
    tensors = load_file(str(src / "model.safetensors"))
    fp8 = dict(tensors)
    quantize = [p + "weight" for ps in _experts(src, synthetic_config_of(src)).values() for p in ps]
    if dense_too:
        quantize += [k for k in tensors if k.endswith(("q_proj.weight", "o_proj.weight"))]
    for key in quantize:
        fp8[key], fp8[key + "_scale_inv"] = _fp8_block(tensors[key])
    cfg = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}}
    return _rewrite(src, tmp_path / "fp8", fp8, cfg)


def _gptq(w, group, v1=True):
    """[out, in] -> GPTQ (qweight I32 [in/8, out], qzeros I32 [in/g, out/8], scales F16 [in/g, out]) with
    asymmetric min/max groups, and the dequantized values (w = (q - z) * s)."""
    out, cols = w.shape
    g = w.float().view(out, cols // group, group)
    lo, hi = g.amin(2).clamp(max=0), g.amax(2).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-6).half()
    zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.int32)  # [out, groups]
    q = (torch.round(g / scale.float()[..., None]) + zero[..., None]).clamp(0, 15).to(torch.int32).view(out, cols)
    deq = ((q.view(out, cols // group, group) - zero[..., None]).float() * scale.float()[..., None]).view(out, cols)
    qt = q.t().contiguous()                                       # [in, out]
    qweight = torch.zeros(cols // 8, out, dtype=torch.int32)
    for k in range(8):
        qweight |= qt[k::8] << (4 * k)
    stored = (zero - 1 if v1 else zero).t().contiguous()          # [groups, out]; v1 stores zero - 1
    qzeros = torch.zeros(cols // group, out // 8, dtype=torch.int32)
    for k in range(8):
        qzeros |= (stored[:, k::8] & 0xF) << (4 * k)
    return qweight, qzeros, scale.t().contiguous(), deq


def _gptq_checkpoint(tmp_path, src, group=32, version="gptq"):
    tensors = load_file(str(src / "model.safetensors"))
    q4, deq = dict(tensors), dict(tensors)
    quantize = [p + "weight" for ps in _experts(src, synthetic_config_of(src)).values() for p in ps]
    quantize += [k for k in tensors if k.endswith(("k_proj.weight", "v_proj.weight"))]
    for key in quantize:
        prefix = key[: -len("weight")]
        qweight, qzeros, scales, d = _gptq(tensors[key], group, v1=version == "gptq")
        del q4[key]
        q4[prefix + "qweight"], q4[prefix + "qzeros"], q4[prefix + "scales"] = qweight, qzeros, scales
        q4[prefix + "g_idx"] = torch.arange(tensors[key].shape[1], dtype=torch.int32) // group
        deq[key] = d
    cfg = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                   "sym": False, "checkpoint_format": version}}
    return _rewrite(src, tmp_path / "gptq", q4, cfg), _rewrite(src, tmp_path / "gptq-deq", deq)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_fp8_block_checkpoint_is_read_as_published(tmp_path, float_checkpoints, policy):
    fp8 = _fp8_checkpoint(tmp_path, float_checkpoints["qwen2_moe"])
    # transformers dequantizes the experts and the fp8 attention projections itself (fp32 model).
    want = greedy(AutoModelForCausalLM.from_pretrained(fp8, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                        dtype=torch.float32), PROMPT, every_step=True)
    model = _load(fp8, policy=POLICIES[policy])
    assert model.moerun.memory()["experts"]["format"] == "fp8-block128"
    assert model.moerun.memory()["experts"]["checkpoint_quantization"] == "fp8-block128"
    assert_matches(greedy(model, PROMPT, every_step=True), want)


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_gptq_checkpoint_is_read_as_published(tmp_path, float_checkpoints, version):
    q4, deq = _gptq_checkpoint(tmp_path, float_checkpoints["qwen2_moe"], version=version)
    want = greedy(AutoModelForCausalLM.from_pretrained(deq), PROMPT, every_step=True)
    model = _load(q4, policy=POLICIES["cpu_fallback"])
    assert model.moerun.memory()["experts"]["format"] == "int4-g32"
    assert_matches(greedy(model, PROMPT, every_step=True), want)


def test_a_quantized_checkpoint_asked_for_another_format_is_refused(tmp_path, float_checkpoints):
    fp8 = _fp8_checkpoint(tmp_path, float_checkpoints["qwen2_moe"], dense_too=False)
    with pytest.raises(ExpertFormatError, match=r"experts are fp8-block128 .* would not be exact"):
        _load(fp8, expert_format="int4")
    with pytest.raises(ExpertFormatError, match="unknown expert_format 'int3'.*int4-g128"):
        _load(float_checkpoints["qwen2_moe"], expert_format="int3")
    with pytest.raises(ExpertFormatError, match="compute dtype.*float32.*dtype=torch.bfloat16"):
        _load(float_checkpoints["qwen2_moe"], expert_format="bf16")
    with pytest.raises(ValueError, match=r"int4-g128 groups 128 inputs, which must divide both hidden_size \(64\)"):
        _load(float_checkpoints["qwen2_moe"], expert_format="int4")


def _edit(path, fn, config_fn=None):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if config_fn:
        cfg = json.loads((path / "config.json").read_text())
        config_fn(cfg["quantization_config"])
        (path / "config.json").write_text(json.dumps(cfg))


def _first_expert_key(path, suffix):
    return next(k for k in load_file(str(path / "model.safetensors")) if ".experts.0." in k and k.endswith(suffix))


@pytest.mark.parametrize("case, match", [
    ("wrong scale shape", r"weight_scale_inv has shape \[1, 2\], expected \[1, 1\]"),
    ("mixed formats", r"gate_proj.weight is torch.bfloat16; fp8-block128 experts need torch.float8_e4m3fn"),
    ("block size", r"weight_block_size is \[64, 64\]"),
])
def test_bad_fp8_checkpoints_fail_before_allocating(tmp_path, float_checkpoints, case, match):
    fp8 = _fp8_checkpoint(tmp_path, float_checkpoints["qwen2_moe"], dense_too=False)
    key = _first_expert_key(fp8, "gate_proj.weight_scale_inv")
    if case == "wrong scale shape":
        _edit(fp8, lambda t: t.__setitem__(key, torch.ones(1, 2)))
    elif case == "mixed formats":  # one expert left in bf16: a checkpoint mixing formats
        w = key[: -len("_scale_inv")]
        _edit(fp8, lambda t: (t.__setitem__(w, t[w].float().bfloat16()), t.pop(key)))
    else:
        _edit(fp8, lambda t: None, lambda q: q.__setitem__("weight_block_size", [64, 64]))
    with pytest.raises((CheckpointError, ExpertFormatError), match=match):
        moerun.memory_plan(fp8, device="cpu", max_context=64)


@pytest.mark.parametrize("case, match", [
    ("desc_act", "desc_act is true"),
    ("group 256", "group_size is 256"),
    ("bits 8", "bits is 8"),
    ("qzeros shape", r"qzeros has shape \[2, 2\], expected \[2, 4\]"),
])
def test_bad_gptq_checkpoints_fail_before_allocating(tmp_path, float_checkpoints, case, match):
    q4, _ = _gptq_checkpoint(tmp_path, float_checkpoints["qwen2_moe"])
    if case == "desc_act":
        _edit(q4, lambda t: None, lambda q: q.__setitem__("desc_act", True))
    elif case == "group 256":
        _edit(q4, lambda t: None, lambda q: q.__setitem__("group_size", 256))
    elif case == "bits 8":
        _edit(q4, lambda t: None, lambda q: q.__setitem__("bits", 8))
    else:
        key = _first_expert_key(q4, "gate_proj.qzeros")
        _edit(q4, lambda t: t.__setitem__(key, torch.zeros(2, 2, dtype=torch.int32)))
    with pytest.raises((CheckpointError, ExpertFormatError), match=match):
        moerun.memory_plan(q4, device="cpu", max_context=64)
