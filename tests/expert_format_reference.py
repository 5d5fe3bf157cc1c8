"""Reference encoders and decoders of the expert formats, in plain torch, written from the formats'
definitions (csrc/expert_format.h) and not from moerun's native code: the tests hold the native
encoder, the CPU kernels and the Triton kernels to these.

``encode(layout, gate, up, down[, gate_up_bias, down_bias])`` -> the slot's bytes (uint8 [slot_bytes]);
``decode(layout, slot)`` -> ``(gate_up [2I, H], down [H, I])`` in fp32, ``decode_biases(layout, slot)`` ->
``(gate_up_bias [2I], down_bias [H])``. Every decode is one fp32 multiply of exact operands, so a correct
kernel's dequantized weights equal these bit for bit. ``expert_output`` is one expert's math in float64
(the activations of csrc/expert_activation.h, written from transformers' modeling code).
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8 e4m3fn
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


# -- codes -------------------------------------------------------------------------------------------------
def _fp8(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8 e4m3fn bytes, round to nearest even, saturating at +-448."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _fp8_value(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float8_e4m3fn).float()


def _e2m1(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> e2m1 codes (0..15), nearest with ties to the even code, saturating at +-6."""
    m = v.abs()
    code = ((m > 0.25).int() + (m >= 0.75).int() + (m > 1.25).int() + (m >= 1.75).int()
            + (m > 2.5).int() + (m >= 3.5).int() + (m > 5.0).int())
    return (code + 8 * (v < 0).int()).to(torch.uint8)


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """[R, C] of 4-bit codes -> [R, C/2] bytes, column 2j in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack4(b: torch.Tensor, cols: int) -> torch.Tensor:
    b = b.view(-1, cols // 2)
    out = torch.empty(b.shape[0], cols, dtype=torch.uint8)
    out[:, 0::2], out[:, 1::2] = b & 0xF, b >> 4
    return out


# -- one matrix --------------------------------------------------------------------------------------------
def _blocks(rows: int, cols: int, edge: int):
    for rb in range(0, rows, edge):
        for cb in range(0, cols, edge):
            yield slice(rb, rb + edge), slice(cb, cb + edge)


def encode_matrix(fmt: str, group: int, w: torch.Tensor, split_rows: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One matrix [R, C] (any float dtype) -> (weights, scales, zeros) as flat uint8 tensors."""
    w = w.float()
    rows, cols = w.shape
    if fmt in ("fp8", "int8"):
        amax = w.abs().amax(dim=1)
        limit = FP8_MAX if fmt == "fp8" else 127.0
        scale = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
        v = w / scale[:, None]
        q = _fp8(v) if fmt == "fp8" else torch.round(v).clamp(-127, 127).to(torch.int8).view(torch.uint8)
        return q.flatten(), scale.view(torch.uint8), None
    if fmt == "fp8-block128":
        parts = [w[i:i + split_rows] for i in range(0, rows, split_rows)]  # gate and up blocked separately
        qs, scales = [], []
        for part in parts:
            q = torch.empty(part.shape, dtype=torch.uint8)
            nrb, ncb = -(-part.shape[0] // group), -(-cols // group)
            s = torch.empty(nrb, ncb)
            for rs, cs in _blocks(part.shape[0], cols, group):
                blk = part[rs, cs]
                amax = blk.abs().max()
                sc = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
                s[rs.start // group, cs.start // group] = sc
                q[rs, cs] = _fp8(blk / sc)
            qs.append(q.flatten())
            scales.append(s.flatten())
        return torch.cat(qs), torch.cat(scales).view(torch.uint8), None
    if fmt.startswith("int4-g"):
        g = w.view(rows, cols // group, group)
        lo = g.amin(dim=2).clamp(max=0.0)
        hi = g.amax(dim=2).clamp(min=0.0)
        scale = (hi - lo) / 15.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).view(rows, cols)
        return _pack4(q).flatten(), scale.flatten().view(torch.uint8), zero.to(torch.uint8).flatten()
    if fmt == "mxfp4":
        g = w.view(rows, cols // 32, 32)
        amax = g.abs().amax(dim=2)
        exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax)).clamp(-127, 127)
        q = _e2m1(g / torch.exp2(exp)[..., None]).view(rows, cols)
        return _pack4(q).flatten(), (exp + 127).to(torch.uint8).flatten(), None
    raise ValueError(f"no reference encoder for format {fmt!r}")


def decode_matrix(fmt: str, group: int, rows: int, cols: int, split_rows: int, weights: torch.Tensor,
                  scales: torch.Tensor | None, zeros: torch.Tensor | None) -> torch.Tensor:
    """(weights, scales, zeros) bytes of one matrix -> fp32 [rows, cols]."""
    if fmt in ("fp8", "int8"):
        q = _fp8_value(weights) if fmt == "fp8" else weights.view(torch.int8).float()
        return q.view(rows, cols) * scales.view(torch.float32)[:, None]
    if fmt == "fp8-block128":
        q = _fp8_value(weights).view(rows, cols)
        s = scales.view(torch.float32)
        out = torch.empty(rows, cols)
        nrb, ncb = -(-split_rows // group), -(-cols // group)
        for p in range(rows // split_rows):
            sp = s[p * nrb * ncb:(p + 1) * nrb * ncb].view(nrb, ncb)
            full = sp.repeat_interleave(group, 0)[:split_rows].repeat_interleave(group, 1)[:, :cols]
            r = slice(p * split_rows, (p + 1) * split_rows)
            out[r] = q[r] * full
        return out
    if fmt.startswith("int4-g"):
        q = _unpack4(weights, cols).float().view(rows, cols // group, group)
        s = scales.view(torch.float32).view(rows, cols // group, 1)
        z = zeros.float().view(rows, cols // group, 1)
        return ((q - z) * s).view(rows, cols)
    if fmt == "mxfp4":
        q = E2M1_VALUES[_unpack4(weights, cols).long()].view(rows, cols // 32, 32)
        s = torch.exp2(scales.float() - 127).view(rows, cols // 32, 1)
        return (q * s).view(rows, cols)
    raise ValueError(f"no reference decoder for format {fmt!r}")


# -- one slot ----------------------------------------------------------------------------------------------
def encode(layout, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
           down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """gate/up [I, H], down [H, I] (and, for a layout with biases, gate_up_bias [2I]: gate then up, and
    down_bias [H], stored in layout.dtype after every other part) -> one slot's bytes (uint8
    [layout.slot_bytes], zero padding)."""
    slot = torch.zeros(layout.slot_bytes, dtype=torch.uint8)
    I = layout.inter_size
    assert (gate_up_bias is not None) == layout.has_bias == (down_bias is not None)
    if layout.has_bias:
        for name, b in (("gate_up_bias", gate_up_bias), ("down_bias", down_bias)):
            off, size = getattr(layout, f"{name}_offset"), getattr(layout, f"{name}_bytes")
            assert off % 16 == 0 and size == b.numel() * layout.dtype.itemsize
            slot[off:off + size] = b.to(layout.dtype).contiguous().view(torch.uint8)
    if not layout.quantized:
        gate_up = torch.cat([gate, up]).to(layout.dtype).contiguous().view(torch.uint8).flatten()
        slot[layout.gate_up_offset:layout.gate_up_offset + layout.gate_up_bytes] = gate_up
        slot[layout.down_offset:layout.down_offset + layout.down_bytes] = down.to(layout.dtype).contiguous().view(torch.uint8).flatten()
        return slot
    for name, w, split in (("gate_up", torch.cat([gate, up]), I), ("down", down, layout.hidden_size)):
        parts = encode_matrix(layout.format, layout.group_size, w, split)
        for suffix, data in zip(("", "_scales", "_zeros"), parts):
            size = getattr(layout, f"{name}{suffix}_bytes")
            assert (data is None and size == 0) or data.numel() == size, (name, suffix, size)
            if data is not None:
                off = getattr(layout, f"{name}{suffix}_offset")
                slot[off:off + size] = data
    return slot


def decode(layout, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot (any dtype, viewed as its bytes) -> (gate_up [2I, H], down [H, I]) in fp32."""
    raw = slot.contiguous().view(torch.uint8).flatten()
    H, I = layout.hidden_size, layout.inter_size

    def part(name):
        size = getattr(layout, f"{name}_bytes")
        off = getattr(layout, f"{name}_offset")
        return raw[off:off + size].clone() if size else None

    if not layout.quantized:
        return (part("gate_up").view(layout.dtype).float().view(2 * I, H),
                part("down").view(layout.dtype).float().view(H, I))
    gate_up = decode_matrix(layout.format, layout.group_size, 2 * I, H, I,
                            part("gate_up"), part("gate_up_scales"), part("gate_up_zeros"))
    down = decode_matrix(layout.format, layout.group_size, H, I, H,
                         part("down"), part("down_scales"), part("down_zeros"))
    return gate_up, down


def decode_biases(layout, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot of a layout with biases -> (gate_up_bias [2I], down_bias [H]) in fp32."""
    raw = slot.contiguous().view(torch.uint8).flatten()
    return tuple(raw[getattr(layout, f"{n}_offset"):getattr(layout, f"{n}_offset") + getattr(layout, f"{n}_bytes")]
                 .clone().view(layout.dtype).float() for n in ("gate_up_bias", "down_bias"))


# -- one expert's math -------------------------------------------------------------------------------------
def activate(g: torch.Tensor, u: torch.Tensor, activation=None) -> torch.Tensor:
    """h of gate and up values (biases added): silu(g) * u, or gpt-oss's clamped SwiGLU as transformers'
    GptOssExperts._apply_gate computes it (gate clamped above, up on both sides, (up + 1) * glu)."""
    if activation is None or activation.name == "silu":
        return torch.nn.functional.silu(g) * u
    assert activation.name == "swiglu_clamped", activation
    g = g.clamp(min=None, max=activation.limit)
    u = u.clamp(min=-activation.limit, max=activation.limit)
    return (u + 1) * (g * torch.sigmoid(g * activation.alpha))


def expert_output(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, biases=None, activation=None) -> torch.Tensor:
    """down(act(gate(x), up(x))) in float64 for tokens x [n, H]; biases: (gate_up_bias [2I], down_bias [H]) or None."""
    inter = down.shape[1]
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    g, u = x @ gate_up[:inter].T, x @ gate_up[inter:].T  # [n, I]
    if biases is not None:
        g, u = g + biases[0][:inter].double(), u + biases[0][inter:].double()
    y = activate(g, u, activation) @ down.T  # [n, H]
    return y + biases[1].double() if biases is not None else y
