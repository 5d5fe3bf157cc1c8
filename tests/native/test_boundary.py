"""The native boundary is declared in one place: moerun/_C.pyi names exactly what moerun._C exports,
and the slot layout every part uses is the native one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from moerun.native import EXPERT_FORMATS, _C, ExpertArena, HostPool, slot_layout, slot_views

PYI = Path(__file__).resolve().parents[2] / "moerun" / "_C.pyi"


def _declared() -> dict[str, set[str] | None]:
    """Top-level names of the stub; for classes, the set of their member names."""
    out: dict[str, set[str] | None] = {}
    for node in ast.parse(PYI.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = None
        elif isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            out[node.name] = members
    return out


def test_the_stub_declares_exactly_what_the_extension_exports():
    declared = _declared()
    exported = {n for n in dir(_C) if not n.startswith("_")}
    assert set(declared) == exported
    for name, members in declared.items():
        if members is None:
            continue
        native = {n for n in dir(getattr(_C, name)) if not n.startswith("_")}
        assert members - {"__init__"} == native, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_slot_layout_is_the_one_the_arena_and_pool_use(dtype):
    H, I = 8, 5  # 3 * 8 * 5 = 120 elements -> padded to 128
    layout = slot_layout(dtype, H, I)
    item = torch.tensor([], dtype=dtype).element_size()
    assert (layout.slot_elems, layout.slot_bytes) == (128, 128 * item)
    assert (layout.gate_up_offset, layout.gate_up_bytes) == (0, 2 * I * H * item)
    assert (layout.down_offset, layout.down_bytes) == (2 * I * H * item, H * I * item)
    assert layout.gate_up_scales_bytes == layout.down_scales_bytes == 0
    arena = ExpertArena(2, layout.slot_elems, dtype, "cpu", 1, 1)
    pool = HostPool(1, 1, H, I, dtype, pinned=False)
    assert arena.slot_bytes == pool.slot_bytes == layout.slot_bytes and pool.slot_elems == layout.slot_elems
    gate, up, down = (torch.randn(I, H).to(dtype), torch.randn(I, H).to(dtype), torch.randn(H, I).to(dtype))
    pool.write_expert(0, 0, gate, up, down)
    gate_up_view, down_view = slot_views(layout, pool.view(0, 0))
    assert torch.equal(gate_up_view, torch.cat([gate, up])) and torch.equal(down_view, down)
    assert not pool.view(0, 0)[3 * H * I:].any()  # the padding is zeros


def test_slot_layout_rejects_what_has_no_layout():
    with pytest.raises(ValueError, match="positive"):
        slot_layout(torch.float32, 0, 4)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        slot_layout(torch.int8, 8, 4)


@pytest.mark.parametrize("fmt", EXPERT_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_biases_sit_after_every_other_part_in_every_format(fmt, dtype):
    H, I = 256, 136 if not fmt.startswith(("int4", "mxfp4")) else 128
    plain, biased = slot_layout(dtype, H, I, fmt), slot_layout(dtype, H, I, fmt, bias=True)
    assert not plain.has_bias and plain.gate_up_bias_bytes == plain.down_bias_bytes == 0 and biased.has_bias
    parts = ("gate_up", "gate_up_scales", "gate_up_zeros", "down", "down_scales", "down_zeros")
    for part in parts:  # the other parts stay where they are without biases
        for what in ("_offset", "_bytes"):
            assert getattr(biased, part + what) == getattr(plain, part + what), part + what
    end = max(getattr(plain, p + "_offset") + getattr(plain, p + "_bytes") for p in parts)
    item = dtype.itemsize
    assert biased.gate_up_bias_bytes == 2 * I * item and biased.down_bias_bytes == H * item
    assert biased.gate_up_bias_offset == -(-end // 16) * 16  # 16-byte aligned, right after the last part
    assert biased.down_bias_offset == -(-(biased.gate_up_bias_offset + 2 * I * item) // 16) * 16
    assert biased.slot_bytes >= biased.down_bias_offset + H * item and biased.slot_bytes % (64 * item) == 0
    assert biased.slot_bytes - plain.slot_bytes < (2 * I + H) * item + 16 + 64 * item
    pool = HostPool(1, 1, H, I, dtype, pinned=False, format=fmt, bias=True)
    assert pool.slot_bytes == biased.slot_bytes and ExpertArena(1, biased.slot_elems, dtype, "cpu", 1, 1).slot_bytes == biased.slot_bytes
