"""gpt-oss's stacked experts into the host pool: the hub's MXFP4 layout read straight into MXFP4 slots (weights
bit-exact against transformers' own dequantization of the same bytes), a float checkpoint into float slots or
quantized at load (equal to encoding the transposed, de-interleaved expert), biases in the slots, and bad files
refused from their headers, naming the tensor."""
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moerun.native import HostPool, encode_expert, slot_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import expert_format_reference as ref  # noqa: E402

E, H, I = 4, 64, 96  # H and I multiples of 32 (MXFP4 blocks); I != H so a transposed read cannot pass by accident
PREFIX = "model.layers.0.mlp.experts."
MXFP4 = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks", "down_proj_scales",
         "down_proj_bias")
FLOAT = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def hub_mxfp4_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's experts as the hub checkpoint stores them: random e2m1 pairs, e8m0 exponents over their whole
    range but 255 (2^-127 included: 0 is a subnormal scale), bf16 biases."""
    def blocks(rows, cols):
        return torch.randint(0, 256, (E, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)

    def scales(rows, cols):
        return torch.randint(0, 255, (E, rows, cols // 32), generator=gen, dtype=torch.uint8)

    return {"gate_up_proj_blocks": blocks(2 * I, H), "gate_up_proj_scales": scales(2 * I, H),
            "gate_up_proj_bias": torch.randn(E, 2 * I, generator=gen).bfloat16(),
            "down_proj_blocks": blocks(H, I), "down_proj_scales": scales(H, I),
            "down_proj_bias": torch.randn(E, H, generator=gen).bfloat16()}


def fill(pool: HostPool, path: Path, names, encoding: str) -> None:
    pool.fill([(0, e, [(str(path), PREFIX + n) for n in names]) for e in range(E)], num_threads=2, encoding=encoding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hub_mxfp4_experts_are_transformers_dequantized_weights_bit_for_bit(tmp_path, dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    seed = random.randrange(2**31)
    t = hub_mxfp4_tensors(torch.Generator().manual_seed(seed))
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + k: v for k, v in t.items()}, str(path))
    pool = HostPool(1, E, H, I, dtype, pinned=False, format="mxfp4", bias=True)
    fill(pool, path, MXFP4, "gpt-oss-mxfp4")
    # transformers' GptOssExperts weights: gate_up_proj [E, H, 2I] (gate columns 0::2, up 1::2), down_proj [E, I, H]
    gate_up = convert_moe_packed_tensors(t["gate_up_proj_blocks"], t["gate_up_proj_scales"], dtype=torch.float32)
    down = convert_moe_packed_tensors(t["down_proj_blocks"], t["down_proj_scales"], dtype=torch.float32)
    assert gate_up.shape == (E, H, 2 * I) and down.shape == (E, I, H)
    for e in range(E):
        got_gu, got_down = ref.decode(pool.layout, pool.view(0, e))  # the slot's weights, as every kernel decodes them
        want_gu = torch.cat([gate_up[e][:, 0::2].T, gate_up[e][:, 1::2].T])  # [2I, H]: gate rows, then up rows
        assert torch.equal(got_gu.view(torch.int32), want_gu.contiguous().view(torch.int32)), f"seed {seed}, expert {e}"
        assert torch.equal(got_down.view(torch.int32), down[e].T.contiguous().view(torch.int32)), f"seed {seed}, expert {e}"
        gu_bias, down_bias = ref.decode_biases(pool.layout, pool.view(0, e))
        b = t["gate_up_proj_bias"][e].float()
        assert torch.equal(gu_bias, torch.cat([b[0::2], b[1::2]]).to(dtype).float())
        assert torch.equal(down_bias, t["down_proj_bias"][e].to(dtype).float())


@pytest.mark.parametrize("fmt", ["float", "int8", "mxfp4", "int4-g32"])
def test_a_float_checkpoint_loads_as_the_transposed_deinterleaved_experts(tmp_path, fmt):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    t = {"gate_up_proj": torch.randn(E, H, 2 * I, generator=gen).bfloat16(),
         "gate_up_proj_bias": torch.randn(E, 2 * I, generator=gen).bfloat16(),
         "down_proj": torch.randn(E, I, H, generator=gen).bfloat16(),
         "down_proj_bias": torch.randn(E, H, generator=gen).bfloat16()}
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + k: v for k, v in t.items()}, str(path))
    pool = HostPool(1, E, H, I, torch.bfloat16, pinned=False, format=fmt, bias=True)
    fill(pool, path, FLOAT, "gpt-oss-float")
    layout = slot_layout(torch.bfloat16, H, I, fmt, bias=True)
    for e in range(E):
        w = t["gate_up_proj"][e]  # [H, 2I], x @ W
        want = encode_expert(layout, w[:, 0::2].T, w[:, 1::2].T, t["down_proj"][e].T, gate_up_bias=torch.cat(
            [t["gate_up_proj_bias"][e][0::2], t["gate_up_proj_bias"][e][1::2]]), down_bias=t["down_proj_bias"][e])
        assert torch.equal(pool.view(0, e).view(torch.uint8), want), f"{fmt}, expert {e}"
    if fmt == "float":  # the float slot holds the checkpoint's values themselves
        gate_up, _ = ref.decode(layout, pool.view(0, 1))
        assert torch.equal(gate_up[I + 5], t["gate_up_proj"][1][:, 11].float())  # up row 5 = column 2 * 5 + 1


@pytest.mark.parametrize("name,bad,message", [
    ("gate_up_proj_blocks", torch.zeros(E, 2 * I, H // 32, 8, dtype=torch.uint8),
     r"gate_up_proj_blocks' in .* \(layer 0, expert 0, gate_up_proj_blocks\) has shape \[4, 192, 2, 8\], "
     r"expected \[4, 192, 2, 16\] \(4 experts, hidden_size 64, intermediate size 96, group 32\)"),
    ("down_proj_scales", torch.zeros(E, H, I // 32 + 1, dtype=torch.uint8), r"down_proj_scales' .* has shape \[4, 64, 4\]"),
    ("down_proj_scales", torch.zeros(E, H, I // 32, dtype=torch.int32), r"down_proj_scales' .* has dtype I32; "
                                                                        r"gpt-oss-mxfp4 experts need U8"),
    ("gate_up_proj_bias", torch.zeros(E - 1, 2 * I, dtype=torch.bfloat16), r"gate_up_proj_bias' .* has shape \[3, 192\]"),
])
def test_bad_mxfp4_files_fail_from_their_headers_naming_the_tensor(tmp_path, name, bad, message):
    t = hub_mxfp4_tensors(torch.Generator().manual_seed(0))
    t[name] = bad
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + k: v for k, v in t.items()}, str(path))
    pool = HostPool(1, E, H, I, torch.bfloat16, pinned=False, format="mxfp4", bias=True)
    with pytest.raises(RuntimeError, match=message):
        fill(pool, path, MXFP4, "gpt-oss-mxfp4")
    assert pool.filled_count == 0  # refused before any expert was read


def test_sources_that_do_not_fit_the_pool_are_refused(tmp_path):
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + k: v for k, v in hub_mxfp4_tensors(torch.Generator().manual_seed(0)).items()}, str(path))
    with pytest.raises(ValueError, match="gpt-oss-mxfp4 cannot fill slots of format int8 exactly"):
        fill(HostPool(1, E, H, I, torch.bfloat16, pinned=False, format="int8", bias=True), path, MXFP4, "gpt-oss-mxfp4")
    with pytest.raises(ValueError, match="carry biases, which this pool's slots do not hold: make the pool with bias=True"):
        fill(HostPool(1, E, H, I, torch.bfloat16, pinned=False, format="mxfp4"), path, MXFP4, "gpt-oss-mxfp4")
    with pytest.raises(ValueError, match="names 6 tensors, got 4"):
        fill(HostPool(1, E, H, I, torch.bfloat16, pinned=False, format="mxfp4", bias=True), path, MXFP4[:4],
             "gpt-oss-mxfp4")
    # a width that is no multiple of 32 fails when the pool's layout is made, before any memory is allocated
    with pytest.raises(ValueError, match="mxfp4 groups 32 inputs, which must divide both hidden_size"):
        HostPool(1, E, H, 80, torch.bfloat16, pinned=False, format="mxfp4", bias=True)


def test_a_float_checkpoint_with_mixed_weight_dtypes_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    t = {"gate_up_proj": torch.randn(E, H, 2 * I, generator=gen).bfloat16(), "gate_up_proj_bias": torch.zeros(E, 2 * I),
         "down_proj": torch.randn(E, I, H, generator=gen), "down_proj_bias": torch.zeros(E, H)}
    path = tmp_path / "experts.safetensors"
    save_file({PREFIX + k: v for k, v in t.items()}, str(path))
    with pytest.raises(RuntimeError, match="gate_up_proj .* is BF16 but down_proj .* is F32"):
        fill(HostPool(1, E, H, I, torch.float32, pinned=False, bias=True), path, FLOAT, "gpt-oss-float")
