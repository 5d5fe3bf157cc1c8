"""The native expert codec (moerun.native.encode_expert / decode_expert) against the pure-torch reference
written from the formats' definitions (tests/expert_format_reference.py): the same bytes, the same
decoded values bit for bit, for every format, on fresh random experts."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from moerun import native

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import expert_format_reference as ref  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def shape_for(fmt: str) -> tuple[int, int]:
    """(H, I) the format can hold: group formats need both divisible by their group (at most 128); the
    others get sizes that leave partial 128-blocks (fp8-block128) and vector tails (200 = 12 * 16 + 8)."""
    return (256, 128) if fmt.startswith("int4") or fmt == "mxfp4" else (328, 200)


def random_expert(H: int, I: int, dtype: torch.dtype, gen: torch.Generator):
    """gate, up [I, H], down [H, I]: rows of magnitudes spread over 1e-3..1e3 (exponents and scales of many
    sizes), one all-zero row and one all-zero block of 32 in each (the zero-scale rules)."""
    def matrix(rows, cols):
        w = torch.randn(rows, cols, generator=gen) * 10 ** (torch.rand(rows, 1, generator=gen) * 6 - 3)
        w[rows // 3] = 0
        w[rows // 2, :32] = 0
        return w.to(dtype)
    return matrix(I, H), matrix(I, H), matrix(H, I)


def fresh_seed() -> int:
    return random.randrange(2**31)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt", native.EXPERT_FORMATS)
@pytest.mark.parametrize("src_dtype", DTYPES)
def test_encode_writes_the_reference_bytes_and_decode_its_values(fmt, src_dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    H, I = shape_for(fmt)
    for model_dtype in DTYPES:  # the slot's element type: the float format's weights, every format's padding
        layout = native.slot_layout(model_dtype, H, I, fmt)
        gate, up, down = random_expert(H, I, src_dtype, gen)
        got = native.encode_expert(layout, gate, up, down)
        want = ref.encode(layout, gate, up, down)
        assert got.dtype == torch.uint8 and got.shape == (layout.slot_bytes,)
        differ = (got != want).nonzero().flatten()
        assert differ.numel() == 0, f"seed {seed}, {model_dtype}: {differ.numel()} bytes differ, first at {differ[:8].tolist()}"
        gate_up, down_fp32 = native.decode_expert(layout, got)
        ref_gate_up, ref_down = ref.decode(layout, want)
        assert gate_up.shape == (2 * I, H) and down_fp32.shape == (H, I) and gate_up.dtype == torch.float32
        assert torch.equal(bits(gate_up), bits(ref_gate_up)), f"seed {seed}, {model_dtype}: gate_up decodes differ"
        assert torch.equal(bits(down_fp32), bits(ref_down)), f"seed {seed}, {model_dtype}: down decodes differ"


@pytest.mark.parametrize("fmt", [f for f in native.EXPERT_FORMATS if f != "float"])
def test_decode_equals_the_reference_for_every_code(fmt):
    # Random weight bytes (every fp8 / int8 code, every nibble) and, where a format has them, random zero
    # points and e8m0 exponents, under the scales an encode wrote: decode covers codes no encoder emits.
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    H, I = shape_for(fmt)
    layout = native.slot_layout(torch.bfloat16, H, I, fmt)
    slot = native.encode_expert(layout, *random_expert(H, I, torch.float32, gen))
    parts = native.slot_parts(layout, slot)
    for name in ("gate_up", "down"):
        parts[name].copy_(torch.randint(0, 256, parts[name].shape, generator=gen, dtype=torch.uint8))
        if f"{name}_zeros" in parts:
            zeros = parts[f"{name}_zeros"]
            zeros.copy_(torch.randint(0, 16, zeros.shape, generator=gen, dtype=torch.uint8))
        if fmt == "mxfp4":  # exponents 2^-126 .. 2^127 (0 and 255 are the subnormal and the no-encoder case)
            scales = parts[f"{name}_scales"]
            scales.copy_(torch.randint(1, 255, scales.shape, generator=gen, dtype=torch.uint8))
    got, want = native.decode_expert(layout, slot), ref.decode(layout, slot)
    for g, w, name in zip(got, want, ("gate_up", "down")):
        # e4m3fn's two NaN codes decode to NaN in both; every other value is bitwise the same.
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"seed {seed}, {name}: {m}")


@pytest.mark.parametrize("fmt", native.EXPERT_FORMATS)
def test_encode_into_a_pool_row_writes_every_byte_in_place(fmt):
    # `out` views one slot of an arena or a pool (model dtype elements); stale bytes there, padding
    # included, must not survive.
    gen = torch.Generator().manual_seed(fresh_seed())
    H, I = shape_for(fmt)
    layout = native.slot_layout(torch.bfloat16, H, I, fmt)
    rows = torch.full((3, layout.slot_elems), float("nan"), dtype=torch.bfloat16)
    expert = random_expert(H, I, torch.bfloat16, gen)
    got = native.encode_expert(layout, *expert, out=rows[1])
    assert got.data_ptr() == rows[1].data_ptr() and got.numel() == layout.slot_bytes
    assert torch.equal(rows[1].view(torch.uint8), ref.encode(layout, *expert))
    assert rows[0].isnan().all() and rows[2].isnan().all()  # its neighbours untouched


def test_the_float_format_converts_to_the_model_dtype():
    gen = torch.Generator().manual_seed(fresh_seed())
    layout = native.slot_layout(torch.float16, 96, 40)
    gate, up, down = random_expert(96, 40, torch.float32, gen)
    gate_up, down_fp32 = native.decode_expert(layout, native.encode_expert(layout, gate, up, down))
    assert torch.equal(gate_up, torch.cat([gate, up]).half().float()) and torch.equal(down_fp32, down.half().float())


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64", "int4-g128", "mxfp4"])
def test_a_group_that_does_not_divide_hidden_or_inter_is_refused(fmt):
    group = native.slot_layout(torch.bfloat16, 256, 128, fmt).group_size
    for H, I in ((group * 2 + 16, 128), (256, group + 16)):
        with pytest.raises(ValueError, match=f"{fmt} groups {group} inputs, which must divide both hidden_size"):
            native.slot_layout(torch.bfloat16, H, I, fmt)


def test_bad_arguments_are_clear_errors():
    layout = native.slot_layout(torch.bfloat16, 128, 64, "int4-g32")
    gate, up, down = torch.randn(64, 128), torch.randn(64, 128), torch.randn(128, 64)
    with pytest.raises(ValueError, match=r"must be \[I, H\], \[I, H\] and \[H, I\] = \[64, 128\]"):
        native.encode_expert(layout, gate, up, down.T)
    with pytest.raises(ValueError, match="share one dtype"):
        native.encode_expert(layout, gate, up.half(), down)
    with pytest.raises(ValueError, match=f"out holds 100 bytes but a slot of the layout's int4-g32 expert .* "
                                         f"holds {layout.slot_bytes}"):
        native.encode_expert(layout, gate, up, down, out=torch.empty(100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        native.encode_expert(layout, gate.double(), up.double(), down.double())
    other = native.slot_layout(torch.bfloat16, 128, 64, "int8")  # a slot of another format: another size
    slot = native.encode_expert(other, gate, up, down)
    with pytest.raises(ValueError, match=f"slot holds {other.slot_bytes} bytes but a slot of the layout's int4-g32"):
        native.decode_expert(layout, slot)
    with pytest.raises(ValueError, match="contiguous 1-D host tensor"):
        native.decode_expert(other, slot.view(2, -1))
