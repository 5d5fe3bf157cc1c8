"""Fused MoE over experts held in arena slots: y[t] = sum_k w[t,k] * down(act(gate(x[t]), up(x[t]))).

act is the expert activation (csrc/expert_activation.h): silu(g) * u, or gpt-oss's clamped SwiGLU
(u' + 1) * g' * sigmoid(alpha * g') with g' = min(g, limit), u' = clamp(u, -limit, limit). A slot
layout with biases (gpt-oss) adds each projection's bias: g = gate(x) + b_gate, u = up(x) + b_up, and
down(h) + b_down; the biases sit in the slot in the model dtype and are added in fp32.

Notation: T tokens, K experts per token, P = T*K (token, expert) pairs, E experts in the layer,
H hidden size, I expert intermediate size, N arena slots, S slot elements.

An expert is one slot row of the arena, laid out by its SlotLayout (csrc/slot_layout.h), whose offsets
the launchers pass in: in the float format gate_up [2I, H] (gate rows first) and down [H, I] at their
element offsets; in a quantized expert format (csrc/expert_format.h: fp8 and int8 per row, fp8 per 128x128
block, int4 per group with zero points, MXFP4) each matrix's codes, scales and zero points at the layout's
byte offsets, which the kernels read as bytes and dequantize in registers. The slot of expert e is
``slot_table[e]`` (-1 = not resident); the kernels read it on the device, so one launch serves any
placement and the launch is graph-capturable. Pairs whose expert is not resident contribute nothing
here (the CPU path adds them).

Two paths, chosen by T (``DECODE_MAX_TOKENS``):
- decode: weight-streaming GEMV. Kernel 1, one program per (pair, block of I rows), streams gate
  and up rows once and writes h = act(g, u) in fp32. Kernel 2, one program per (token, block of
  H rows), streams down rows for each of the token's resident experts and reduces the
  gate-weighted sum in registers, writing the output once. Quantized formats stream the codes in
  16-byte vectors (16 or 32 columns), each reduced in registers and multiplied by its group's scale
  (per-row scales once per row at the end), so a step moves packed bytes only.
- prefill: pairs grouped by expert into blocks of pairs of one expert: BLOCK_M rows each, then the
  expert's remaining pairs rounded up to TAIL_M rows in blocks of BLOCK_M/2 and BLOCK_M/4 (less
  padding: with 128/32, an expert with 136 pairs computes 160 rows, not 256; one with 200, 224).
  Padding is marked with the sentinel P. Two small kernels group them: per-expert counts and the
  block table, then an atomic scatter. Then a grouped GEMM with tl.dot for gate_up (+ the activation)
  and for down (+ gate weight, one row per pair, in the model dtype), weight tiles by pointer loads
  or TMA, each GEMM with its own tile and launch order; and a last kernel that sums each token's K
  rows in fp32. Quantized weight tiles (pointer loads) are dequantized to x's dtype before the dot:
  a reduction step lies within one scale group, so each tile column takes one scale; per-row scales
  multiply the accumulator once.

On Hopper and later every kernel is launched with programmatic dependent launch: it starts while
the previous kernel drains and waits for it before touching memory (``_pdl_wait``).

This module knows nothing about which experts should be resident or how they got there.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fused_moe_config import DECODE_MAX_TOKENS, DecodeConfig, FusedMoeConfig, get_config, short_block_sizes

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# pairs per program of the scatter: one per thread, so a thread waits on one contended atomic
SORT_CHUNK = 128
# pairs per step of the one-program count: its steps are serial dependent loads (ids, then slots)
COUNT_CHUNK = 4096


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL), a kernel is started while the previous one on the
    stream finishes; it waits here for that kernel's writes before it touches global memory, then
    lets the next kernel start. Every kernel here calls it first, so the chain stays ordered."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# --------------------------------------------------------------------------------------------
# expert formats: codes to values, in registers
# --------------------------------------------------------------------------------------------
# The kernels' name of each kind of expert format (csrc/expert_format.h, FormatKind); the group
# size comes from the SlotLayout. Quantized weights are read as bytes, 16 at a time: a vector of
# VC columns (16 for the 8-bit formats, 32 for the 4-bit ones), never across a scale group.
FLOAT = tl.constexpr(0)
FP8 = tl.constexpr(1)  # e4m3 codes, fp32 scale per row
FP8_BLOCK = tl.constexpr(2)  # e4m3 codes, fp32 scale per GROUP x GROUP block (gate and up blocked apart)
INT8 = tl.constexpr(3)  # int8 codes, fp32 scale per row
INT4 = tl.constexpr(4)  # uint4 codes, fp32 scale and uint8 zero point per GROUP columns of a row
MXFP4 = tl.constexpr(5)  # e2m1 codes, e8m0 scale per GROUP (32) columns of a row

# The kernels' name of each expert activation (csrc/expert_activation.h, ActivationKind; KERNEL_ACTIVATIONS
# below ties them to moerun.native.EXPERT_ACTIVATIONS).
SILU = tl.constexpr(0)  # silu(g) * u
SWIGLU_CLAMPED = tl.constexpr(1)  # gpt-oss: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit)


@triton.jit
def _activate(g, u, alpha, limit, ACT: tl.constexpr):
    """h of fp32 gate and up values (biases already added): the expert activation ACT."""
    if ACT == SILU:
        return g * tl.sigmoid(g) * u
    else:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return (u + 1.0) * (g * tl.sigmoid(alpha * g))


@triton.jit
def _code_values(q, FMT: tl.constexpr):
    """Codes -> fp32 values before any scale, exactly. q: the bytes (uint8) of the 8-bit formats, the
    nibbles (int32, 0..15) of the 4-bit ones. int4 gives q (zero points are the caller's); mxfp4 gives
    the e2m1 value times 2^-14 (built as fp16 bits, where e2m1's 0.5 is a normal number)."""
    if FMT == FP8 or FMT == FP8_BLOCK:
        return q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif FMT == INT8:
        # no int -> float conversion instruction: the bits of 2^23 + (q ^ 0x80) as an fp32, minus 2^23 + 128
        return ((q.to(tl.int32) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    elif FMT == INT4:
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + q, minus 2^23
    else:
        # e2m1 (sign, 2 exponent bits, 1 mantissa bit) into fp16's sign, exponent and mantissa top bits
        return (((q & 7) << 9) | ((q & 8) << 12)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_values(s, FMT: tl.constexpr):
    """Stored scales -> fp32: mxfp4's e8m0 exponents (uint8) as 2^(e - 127) (e = 0, 2^-127, reads as 0),
    the others' fp32 as they are."""
    if FMT == MXFP4:
        return (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    else:
        return s


@triton.jit
def _vector_values(b, FMT: tl.constexpr):
    """[R, NV, 16] bytes -> [R, NV, VC] code values (_code_values): 4-bit codes two a byte, column 2j in
    the low nibble."""
    if FMT == INT4 or FMT == MXFP4:
        b32 = b.to(tl.int32)
        return _code_values(tl.interleave(b32 & 0xF, b32 >> 4), FMT)
    else:
        return _code_values(b, FMT)


@triton.jit
def _slot_parts(arena_ptr, scale_ptr, slot, stride_slot, stride_slot_f32, w_off, s_off, z_off, FMT: tl.constexpr):
    """Pointers to one matrix's parts in a quantized slot: codes and zero points (bytes), scales (fp32,
    mxfp4: bytes). arena_ptr is the arena's bytes, scale_ptr the same memory as fp32."""
    base = arena_ptr + slot.to(tl.int64) * stride_slot
    if FMT == MXFP4:
        sc_ptr = base + s_off
    else:
        sc_ptr = scale_ptr + slot.to(tl.int64) * stride_slot_f32 + s_off // 4
    return base + w_off, sc_ptr, base + z_off


@triton.jit
def _decode_rows_dot(
    x_ptr, w_ptr, sc_ptr, z_ptr, rows, row_ok, srow, C,
    FMT: tl.constexpr, GROUP: tl.constexpr, VC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """[BLOCK_R] fp32: sum_c w[r, c] * x[c] for the rows ``rows`` of a quantized matrix [R, C] whose codes
    start at w_ptr (row-major, C * 16 / VC bytes a row); ``srow``: each row's row in the scale (and
    zero point) matrix. x [C], any float dtype. Each step reads BLOCK_C columns of every row as
    16-byte vectors and reduces each vector in registers; a group's scale multiplies its vectors' sums."""
    NV: tl.constexpr = BLOCK_C // VC
    row_bytes = C * 16 // VC
    v = tl.arange(0, NV)
    vb = v[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]  # [1, NV, 16] byte of the step
    vcol = v[None, :, None] * VC + tl.arange(0, VC)[None, None, :]  # [1, NV, VC] column of the step
    w_rows = w_ptr + rows[:, None, None].to(tl.int64) * row_bytes  # [BR, 1, 1]
    acc = tl.zeros((BLOCK_R, NV), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        byte = c0 * 16 // VC + vb
        b = tl.load(w_rows + byte, mask=row_ok[:, None, None] & (byte < row_bytes), other=0)  # [BR, NV, 16]
        cols = c0 + vcol
        xv = tl.load(x_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)  # [1, NV, VC]
        part = tl.sum(_vector_values(b, FMT) * xv, axis=2)  # [BR, NV]
        if FMT == FP8_BLOCK or FMT == INT4 or FMT == MXFP4:
            vc0 = c0 + v * VC  # [NV] first column of each vector
            sidx = srow[:, None] * tl.cdiv(C, GROUP) + (vc0 // GROUP)[None, :]  # [BR, NV]
            sm = row_ok[:, None] & (vc0 < C)[None, :]
            if FMT == INT4:  # sum (q - z) x = sum q x - z sum x
                part -= tl.load(z_ptr + sidx, mask=sm, other=0).to(tl.float32) * tl.sum(xv, axis=2)
            acc += part * _scale_values(tl.load(sc_ptr + sidx, mask=sm, other=0), FMT)
        else:
            acc += part
    out = tl.sum(acc, axis=1)  # [BR]
    if FMT == MXFP4:
        out *= 16384.0  # the 2^14 of _code_values
    if FMT == FP8 or FMT == INT8:
        out *= tl.load(sc_ptr + srow, mask=row_ok, other=0.0)
    return out


@triton.jit
def _decode_down_quantized(
    h_ptr, ids_ptr, weights_ptr, table_ptr, arena_ptr, scale_ptr, token, rows, row_ok,
    H, I, stride_slot, stride_slot_f32, w_off, s_off, z_off,
    K: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_I: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
    VC: tl.constexpr,
):
    """The down kernel's quantized formats: [BO] fp32 sum over the token's resident experts of
    w * down[rows, :] . h, reading each expert's codes as _decode_rows_dot does (K unrolled, all K
    experts' loads in flight at once; a non-resident expert's loads fully masked)."""
    NV: tl.constexpr = BLOCK_I // VC
    row_bytes = I * 16 // VC
    v = tl.arange(0, NV)
    vb = v[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]  # [1, NV, 16]
    vcol = v[None, :, None] * VC + tl.arange(0, VC)[None, None, :]  # [1, NV, VC]
    if FMT == FP8_BLOCK:
        srow = rows // GROUP
    else:
        srow = rows
    acc = tl.zeros((BLOCK_OUT, NV), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + vcol
        byte = i0 * 16 // VC + vb
        vc0 = i0 + v * VC  # [NV]
        for k in tl.static_range(K):
            pair = token * K + k
            slot = tl.load(table_ptr + tl.load(ids_ptr + pair))
            i_end = tl.where(slot >= 0, I, 0)  # a non-resident expert masks every column
            w = tl.load(weights_ptr + pair).to(tl.float32)
            w_ptr, sc_ptr, z_ptr = _slot_parts(arena_ptr, scale_ptr, tl.maximum(slot, 0), stride_slot,
                                               stride_slot_f32, w_off, s_off, z_off, FMT)
            b = tl.load(w_ptr + rows[:, None, None].to(tl.int64) * row_bytes + byte,
                        mask=row_ok[:, None, None] & (byte < i_end * 16 // VC), other=0)  # [BO, NV, 16]
            hv = tl.load(h_ptr + pair.to(tl.int64) * I + cols, mask=cols < i_end, other=0.0) * w  # [1, NV, VC]
            part = tl.sum(_vector_values(b, FMT) * hv, axis=2)  # [BO, NV]
            if FMT == FP8_BLOCK or FMT == INT4 or FMT == MXFP4:
                sidx = srow[:, None] * tl.cdiv(I, GROUP) + (vc0 // GROUP)[None, :]  # [BO, NV]
                sm = row_ok[:, None] & (vc0 < i_end)[None, :]
                if FMT == INT4:
                    part -= tl.load(z_ptr + sidx, mask=sm, other=0).to(tl.float32) * tl.sum(hv, axis=2)
                acc += part * _scale_values(tl.load(sc_ptr + sidx, mask=sm, other=0), FMT)
            else:
                acc += part * tl.load(sc_ptr + rows, mask=rows < tl.where(slot >= 0, H, 0), other=0.0)[:, None]
    y = tl.sum(acc, axis=1)  # [BO]
    if FMT == MXFP4:
        y *= 16384.0
    return y


@triton.jit
def _weight_tile(
    w_cols, ks, col_ok, C, sc_ptr, z_ptr, srow, k0, out_dtype: tl.constexpr,
    FMT: tl.constexpr, GROUP: tl.constexpr, VC: tl.constexpr,
):
    """[BK, NC] weights W[row(n), ks[k]] of a quantized matrix [R, C] for tl.dot, in out_dtype: w_cols
    [1, NC] points at each tile column's matrix row, srow [NC] is its row of the scales. Group formats:
    the step's columns ks lie in one group (BK <= GROUP), so a tile column has one scale (and zero
    point), applied here; per-channel formats come back unscaled (exact in any float dtype) and the
    caller scales the accumulator's columns."""
    k_ok = (ks < C)[:, None] & col_ok[None, :]
    if VC == 32:  # two codes a byte, low nibble first
        b = tl.load(w_cols + (ks // 2)[:, None], mask=k_ok, other=0).to(tl.int32)
        vals = _code_values((b >> ((ks % 2) * 4)[:, None]) & 0xF, FMT)
    else:
        vals = _code_values(tl.load(w_cols + ks[:, None], mask=k_ok, other=0), FMT)
    if FMT == FP8_BLOCK or FMT == INT4 or FMT == MXFP4:
        sidx = srow * tl.cdiv(C, GROUP) + k0 // GROUP  # [NC]
        sc = _scale_values(tl.load(sc_ptr + sidx, mask=col_ok, other=0), FMT)
        if FMT == INT4:
            vals -= tl.load(z_ptr + sidx, mask=col_ok, other=0).to(tl.float32)[None, :]
        if FMT == MXFP4:
            sc *= 16384.0
        vals *= sc[None, :]
    return vals.to(out_dtype)


# --------------------------------------------------------------------------------------------
# decode path: weight streaming
# --------------------------------------------------------------------------------------------
@triton.jit
def _decode_gate_up_kernel(
    x_ptr,  # [T, H]
    ids_ptr,  # [P] expert id of each pair
    table_ptr,  # [E] int32 slot of each expert, -1 = not resident
    arena_ptr,  # [N, S] (float format), else the arena's bytes [N, slot_bytes]
    scale_ptr,  # quantized formats: the arena's bytes as fp32 [N, slot_bytes / 4]; float: unused
    h_ptr,  # [P, I] fp32 out: act(gate, up)
    bias_ptr,  # the arena in the model dtype [N, S]: gate_up's biases [2I] at element b_off of a slot
    H, I, K,
    stride_x, stride_slot, stride_slot_f32, stride_bias,
    w_off, s_off, z_off,  # into a slot (units of arena_ptr: float elements, quantized bytes): gate_up's weights,
    # scales, zero points
    b_off, alpha, limit,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, VC: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_wait(PDL)
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(table_ptr + expert)
    if FMT != FLOAT:
        if slot >= 0:
            token = pair // K
            rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate rows
            w_ptr, sc_ptr, z_ptr = _slot_parts(arena_ptr, scale_ptr, slot, stride_slot, stride_slot_f32,
                                               w_off, s_off, z_off, FMT)
            # gate rows are rows 0..I-1 of the matrix, up rows I..2I-1; fp8-block128 blocks them apart
            if FMT == FP8_BLOCK:
                gate_srow, up_srow = rows // GROUP, tl.cdiv(I, GROUP) + rows // GROUP
            else:
                gate_srow, up_srow = rows, I + rows
            g = _decode_rows_dot(x_ptr + token * stride_x, w_ptr, sc_ptr, z_ptr, rows, rows < I, gate_srow, H,
                                 FMT, GROUP, VC, BLOCK_N, BLOCK_H)
            u = _decode_rows_dot(x_ptr + token * stride_x, w_ptr + I.to(tl.int64) * (H * 16 // VC), sc_ptr, z_ptr,
                                 rows, rows < I, up_srow, H, FMT, GROUP, VC, BLOCK_N, BLOCK_H)
            if HAS_BIAS:
                b_ptr = bias_ptr + slot.to(tl.int64) * stride_bias + b_off
                g += tl.load(b_ptr + rows, mask=rows < I, other=0.0).to(tl.float32)
                u += tl.load(b_ptr + I + rows, mask=rows < I, other=0.0).to(tl.float32)
            h = _activate(g, u, alpha, limit, ACT)
            tl.store(h_ptr + pair.to(tl.int64) * I + rows, h, mask=rows < I)
    elif slot >= 0:
        token = pair // K
        gate_base = arena_ptr + slot.to(tl.int64) * stride_slot + w_off
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        row_ok = rows < I
        cols0 = tl.arange(0, BLOCK_H)  # [BH]
        acc_g = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
        gate_rows = gate_base + rows[:, None].to(tl.int64) * H  # [BN, 1]
        up_rows = gate_rows + I.to(tl.int64) * H
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + cols0
            col_ok = cols < H
            xv = tl.load(x_ptr + token * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BH]
            m = row_ok[:, None] & col_ok[None, :]
            wg = tl.load(gate_rows + cols[None, :], mask=m, other=0.0)  # [BN, BH]
            wu = tl.load(up_rows + cols[None, :], mask=m, other=0.0)
            acc_g += wg.to(tl.float32) * xv[None, :]
            acc_u += wu.to(tl.float32) * xv[None, :]
        g = tl.sum(acc_g, axis=1)  # [BN]
        u = tl.sum(acc_u, axis=1)
        if HAS_BIAS:
            b_ptr = bias_ptr + slot.to(tl.int64) * stride_bias + b_off
            g += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            u += tl.load(b_ptr + I + rows, mask=row_ok, other=0.0).to(tl.float32)
        h = _activate(g, u, alpha, limit, ACT)
        tl.store(h_ptr + pair.to(tl.int64) * I + rows, h, mask=row_ok)


@triton.jit
def _decode_down_kernel(
    h_ptr,  # [P, I] fp32
    ids_ptr,  # [P]
    weights_ptr,  # [P] fp32 gate weights
    table_ptr,  # [E] int32
    arena_ptr,  # [N, S] (float format), else the arena's bytes [N, slot_bytes]
    scale_ptr,  # quantized formats: the arena's bytes as fp32 [N, slot_bytes / 4]; float: unused
    out_ptr,  # [T, H]
    bias_ptr,  # the arena in the model dtype [N, S]: down's biases [H] at element b_off of a slot
    H, I,
    stride_out, stride_slot, stride_slot_f32, stride_bias,
    w_off, s_off, z_off,  # into a slot (units of arena_ptr: float elements, quantized bytes): down's weights,
    # scales, zero points
    b_off,
    K: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_I: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr,
    VC: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_wait(PDL)
    token = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # [BO] output (hidden) rows
    row_ok = rows < H
    if FMT != FLOAT:
        y = _decode_down_quantized(h_ptr, ids_ptr, weights_ptr, table_ptr, arena_ptr, scale_ptr, token, rows,
                                   row_ok, H, I, stride_slot, stride_slot_f32, w_off, s_off, z_off,
                                   K, BLOCK_OUT, BLOCK_I, FMT, GROUP, VC)
    else:
        cols0 = tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_OUT, BLOCK_I), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            cols = i0 + cols0
            # K unrolled with masks instead of branches, so the loads of all K experts are in flight at once;
            # a non-resident expert's loads are fully masked (no memory traffic).
            for k in tl.static_range(K):
                pair = token * K + k
                slot = tl.load(table_ptr + tl.load(ids_ptr + pair))
                i_end = tl.where(slot >= 0, I, 0)  # a non-resident expert masks every column
                w = tl.load(weights_ptr + pair).to(tl.float32)
                down_rows = arena_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_slot + w_off \
                    + rows[:, None].to(tl.int64) * I  # [BO, 1]
                cols_k_ok = cols < i_end
                hv = tl.load(h_ptr + pair.to(tl.int64) * I + cols, mask=cols_k_ok, other=0.0) * w  # [BI]
                wd = tl.load(down_rows + cols[None, :], mask=row_ok[:, None] & cols_k_ok[None, :], other=0.0)
                acc += wd.to(tl.float32) * hv[None, :]
        y = tl.sum(acc, axis=1)  # [BO]
    if HAS_BIAS:  # sum over the resident experts of w * b_down
        for k in tl.static_range(K):
            pair = token * K + k
            slot = tl.load(table_ptr + tl.load(ids_ptr + pair))
            w = tl.load(weights_ptr + pair).to(tl.float32)
            b = tl.load(bias_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bias + b_off + rows,
                        mask=rows < tl.where(slot >= 0, H, 0), other=0.0)  # none for a non-resident expert
            y += w * b.to(tl.float32)
    tl.store(out_ptr + token * stride_out + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------------------------
# prefill path: pairs grouped by expert, then a grouped GEMM
# --------------------------------------------------------------------------------------------
@triton.jit
def _expert_blocks_kernel(
    ids_ptr,  # [P] expert id of each pair
    table_ptr,  # [E] int32 slot of each expert, -1 = not resident
    cursor_ptr,  # [E] int32 out: first sorted row of each expert (the scatter's atomic cursors)
    blocks_ptr,  # [3, num_blocks] int32 out: expert (E = no work), first sorted row, rows of each block
    sorted_pairs_ptr,  # [M_pad] int32 out: the padding rows of each expert's last block set to P
    P, E, num_blocks,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, NUM_TAILS: tl.constexpr,
    CHUNK: tl.constexpr, CHUNK_B: tl.constexpr, CHUNK_J: tl.constexpr, PDL: tl.constexpr,
):
    # One program: counts are a few thousand pairs into <= a few hundred bins, cheaper in one
    # program than a second launch to combine partial histograms.
    _pdl_wait(PDL)
    bins = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for p0 in range(0, P, CHUNK):
        offs = p0 + tl.arange(0, CHUNK)
        ok = offs < P
        e = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
        slot = tl.load(table_ptr + e, mask=ok, other=-1)
        key = tl.where(ok & (slot >= 0), e, E_PAD - 1)  # E_PAD > E: the last bin is no expert's
        counts += tl.histogram(key, E_PAD)
    is_expert = bins < E
    counts = tl.where(is_expert, counts, 0)
    # An expert's pairs: full blocks of BLOCK_M rows, then the rest rounded up to TAIL_M rows and
    # covered by one block per set bit (BLOCK_M/2, BLOCK_M/4, ... down to TAIL_M); a rest that
    # rounds up to BLOCK_M takes one more full block.
    full = counts // BLOCK_M  # [E_PAD]
    rest = (counts - full * BLOCK_M + TAIL_M - 1) // TAIL_M * TAIL_M
    full += (rest == BLOCK_M).to(tl.int32)
    rest = tl.where(rest == BLOCK_M, 0, rest)
    n_blocks = full
    for level in tl.static_range(NUM_TAILS):
        n_blocks += ((rest & (BLOCK_M >> (level + 1))) != 0).to(tl.int32)
    n_rows = full * BLOCK_M + rest
    first_block = tl.cumsum(n_blocks, 0) - n_blocks  # [E_PAD]
    first_row = tl.cumsum(n_rows, 0) - n_rows
    tl.store(cursor_ptr + bins, first_row, mask=is_expert)
    # each expert writes its own full blocks, the j-th of every expert in step j (a few steps:
    # about P / (E * BLOCK_M) + 1), then its short ones, largest first
    for j in range(0, tl.max(full, 0)):
        has = j < full
        tl.store(blocks_ptr + first_block + j, bins, mask=has)
        tl.store(blocks_ptr + num_blocks + first_block + j, first_row + j * BLOCK_M, mask=has)
        tl.store(blocks_ptr + 2 * num_blocks + first_block + j, tl.full((E_PAD,), BLOCK_M, tl.int32), mask=has)
    short_block = first_block + full  # [E_PAD]
    short_row = first_row + full * BLOCK_M
    for level in tl.static_range(NUM_TAILS):  # block sizes BLOCK_M >> (level + 1)
        has = (rest & (BLOCK_M >> (level + 1))) != 0
        tl.store(blocks_ptr + short_block, bins, mask=has)
        tl.store(blocks_ptr + num_blocks + short_block, short_row, mask=has)
        tl.store(blocks_ptr + 2 * num_blocks + short_block, tl.full((E_PAD,), BLOCK_M >> (level + 1), tl.int32),
                 mask=has)
        short_block += has.to(tl.int32)
        short_row += tl.where(has, BLOCK_M >> (level + 1), 0)
    used = tl.sum(n_blocks, 0)
    for b0 in range(used, num_blocks, CHUNK_B):  # the rest: no work
        b = b0 + tl.arange(0, CHUNK_B)
        in_range = b < num_blocks
        tl.store(blocks_ptr + b, E, mask=in_range)
        tl.store(blocks_ptr + num_blocks + b, 0, mask=in_range)
        tl.store(blocks_ptr + 2 * num_blocks + b, 0, mask=in_range)
    # Only padding needs the sentinel: the GEMMs read the rows of live blocks, which the scatter
    # fills up to each expert's count. An expert's padding is under TAIL_M rows.
    pad_first = first_row + counts  # [E_PAD]
    pad_rows = n_rows - counts
    for r0 in range(0, TAIL_M, CHUNK_J):
        r = r0 + tl.arange(0, CHUNK_J)  # [CJ]
        tl.store(sorted_pairs_ptr + pad_first[:, None] + r[None, :], P,
                 mask=is_expert[:, None] & (r[None, :] < pad_rows[:, None]))


@triton.jit
def _scatter_pairs_kernel(
    ids_ptr,  # [P]
    table_ptr,  # [E] int32
    cursor_ptr,  # [E] int32: next free row of each expert
    sorted_pairs_ptr,  # [M_pad] int32 out: pair index at its row
    P,
    CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    # Rows within an expert come in atomic order, which varies run to run; results do not: a GEMM
    # row depends only on its own pair, and the last kernel sums each token's pairs in k order.
    _pdl_wait(PDL)
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ok = offs < P
    e = tl.load(ids_ptr + offs, mask=ok, other=0)
    slot = tl.load(table_ptr + e, mask=ok, other=-1)
    take = ok & (slot >= 0)
    row = tl.atomic_add(cursor_ptr + e, 1, mask=take)
    tl.store(sorted_pairs_ptr + row, offs, mask=take)


@triton.jit
def _block_and_tile(num_blocks, n_tiles, GROUP_M: tl.constexpr):
    """(block, output tile) of this program in a 1-D grid of num_blocks * n_tiles.

    Programs run roughly in launch order. GROUP_M = 0: blocks fastest, so an expert's blocks read each
    weight tile at about the same time (once from HBM) -- for gate_up, whose input rows (x) sit in
    L2 anyway. GROUP_M = g: groups of g blocks, each group's tiles before the next group, so the
    rows a block reads (h, for down: too large for L2 as a whole) are reused by all its tiles.
    """
    pid = tl.program_id(0)
    if GROUP_M == 0:
        block = pid % num_blocks
        tile = pid // num_blocks
    else:
        per_group = GROUP_M * n_tiles
        first = (pid // per_group) * GROUP_M
        size = tl.minimum(num_blocks - first, GROUP_M)
        block = first + (pid % per_group) % size
        tile = (pid % per_group) // size
    return block, tile


@triton.jit
def _gate_up_tile(
    x_ptr, sorted_pairs_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, h_ptr, first_row, pid_n,
    H, I, K, P, stride_x, alpha, limit,
    BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    WEIGHT_DESC: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, VC: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
):
    # The expert's gate_up [2I, H] is at w_ptr, or (WEIGHT_DESC) rows w_row.. of w_desc, the arena
    # seen as rows of H elements; quantized formats: its codes at w_ptr, scales at sc_ptr, zero points at z_ptr;
    # its biases (HAS_BIAS) [2I] at b_ptr.
    pairs = tl.load(sorted_pairs_ptr + first_row + tl.arange(0, BM))  # [BM]
    pair_ok = pairs < P
    tokens = tl.where(pair_ok, pairs // K, 0)
    n0 = pid_n * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)  # [BN] intermediate rows
    row_ok = rows < I
    ks0 = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_x  # [BM, 1]
    if FMT != FLOAT:
        # one [BK, 2*BN] tile dequantized to x's dtype, gate and up rows interleaved, as below
        cols = tl.arange(0, 2 * BLOCK_N)  # [2BN]
        inter_row = n0 + cols // 2
        col_ok = inter_row < I
        w_rows = inter_row + (cols % 2) * I  # [2BN] row of gate_up
        if FMT == FP8_BLOCK:  # gate and up blocked apart
            srow = inter_row // GROUP + (cols % 2) * tl.cdiv(I, GROUP)
        else:
            srow = w_rows
        w_cols = w_ptr + w_rows[None, :].to(tl.int64) * (H * 16 // VC)  # [1, 2BN]
        acc = tl.zeros((BM, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + ks0
            a = tl.load(x_rows + ks[None, :], mask=pair_ok[:, None] & (ks < H)[None, :], other=0.0)  # [BM, BK]
            b = _weight_tile(w_cols, ks, col_ok, H, sc_ptr, z_ptr, srow, k0, x_ptr.dtype.element_ty,
                             FMT, GROUP, VC)  # [BK, 2BN]
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if FMT == FP8 or FMT == INT8:
            acc *= tl.load(sc_ptr + srow, mask=col_ok, other=0.0)[None, :]
        acc_g, acc_u = tl.split(tl.reshape(acc, (BM, BLOCK_N, 2)))  # [BM, BN] each
    elif WEIGHT_DESC:
        # two TMA tiles, W^T [BK, BN] each. Rows past the expert's own (gate rows past I, up rows past
        # 2I) only feed output columns that are never stored; columns past H read as zero.
        acc_g = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + ks0
            a = tl.load(x_rows + ks[None, :], mask=pair_ok[:, None] & (ks < H)[None, :], other=0.0)  # [BM, BK]
            acc_g = tl.dot(a, w_desc.load([w_row + n0, k0]).T, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, w_desc.load([w_row + I + n0, k0]).T, acc_u, input_precision=PRECISION)
    else:
        # one [BK, 2*BN] tile, gate and up rows interleaved: one dot of twice the width
        cols = tl.arange(0, 2 * BLOCK_N)  # [2BN]
        col_ok = n0 + cols // 2 < I
        w_cols = w_ptr + (n0 + cols // 2 + (cols % 2) * I)[None, :].to(tl.int64) * H  # [1, 2BN]
        acc = tl.zeros((BM, 2 * BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + ks0
            a = tl.load(x_rows + ks[None, :], mask=pair_ok[:, None] & (ks < H)[None, :], other=0.0)  # [BM, BK]
            b = tl.load(w_cols + ks[:, None], mask=(ks < H)[:, None] & col_ok[None, :], other=0.0)  # [BK, 2BN]
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        acc_g, acc_u = tl.split(tl.reshape(acc, (BM, BLOCK_N, 2)))  # [BM, BN] each
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + I + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    h = _activate(acc_g, acc_u, alpha, limit, ACT)  # [BM, BN]
    out = h_ptr + pairs[:, None].to(tl.int64) * I + rows[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=pair_ok[:, None] & row_ok[None, :])


# P and num_blocks vary with the prompt (E with the model): not specialized on, so a new prompt length
# compiles nothing
@triton.jit(do_not_specialize=["P", "E", "num_blocks"])
def _prefill_gate_up_kernel(
    x_ptr,  # [T, H]
    sorted_pairs_ptr,  # [M_pad] pair index, P = padding
    blocks_ptr,  # [3, num_blocks] expert (E = no work), first sorted row, rows
    table_ptr,  # [E] int32
    arena_ptr,  # [N, S] (float format), else the arena's bytes [N, slot_bytes]
    scale_ptr,  # quantized formats: the arena's bytes as fp32 [N, slot_bytes / 4]; float: unused
    w_desc,  # TMA descriptor of the arena (WEIGHT_DESC), else unused
    h_ptr,  # [P, I] x.dtype out: act(gate, up)
    bias_ptr,  # the arena in the model dtype [N, S]: gate_up's biases [2I] at element b_off of a slot
    H, I, K, P, E, num_blocks,
    stride_x, stride_slot, stride_slot_f32, slot_rows, stride_bias,
    w_off, s_off, z_off,  # into a slot (units of arena_ptr: float elements, quantized bytes): gate_up's weights,
    # scales, zero points
    b_off, alpha, limit,
    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, WEIGHT_DESC: tl.constexpr, FMT: tl.constexpr,
    GROUP: tl.constexpr, VC: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
):
    # w_desc (WEIGHT_DESC): the arena as [N * slot_rows, H], slot_rows = S / H; gate_up starts w_off / H rows
    # into a slot (the launcher checks that it is a whole number of rows)
    _pdl_wait(PDL)
    block, pid_n = _block_and_tile(num_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert = tl.load(blocks_ptr + block)
    if expert < E:
        first_row = tl.load(blocks_ptr + num_blocks + block)
        n_rows = tl.load(blocks_ptr + 2 * num_blocks + block)
        slot = tl.load(table_ptr + expert)
        if FMT == FLOAT:
            w_ptr = arena_ptr + slot.to(tl.int64) * stride_slot + w_off
            sc_ptr, z_ptr = w_ptr, w_ptr  # unused
        else:
            w_ptr, sc_ptr, z_ptr = _slot_parts(arena_ptr, scale_ptr, slot, stride_slot, stride_slot_f32,
                                               w_off, s_off, z_off, FMT)
        w_row = slot * slot_rows + w_off // H
        b_ptr = bias_ptr + slot.to(tl.int64) * stride_bias + b_off
        # one code path per block size (the constexpr tests drop the sizes this config never uses)
        if TAIL_M == BLOCK_M:
            _gate_up_tile(x_ptr, sorted_pairs_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, h_ptr, first_row,
                          pid_n, H, I, K, P, stride_x, alpha, limit, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
                          WEIGHT_DESC, FMT, GROUP, VC, HAS_BIAS, ACT)
        elif n_rows == BLOCK_M:
            _gate_up_tile(x_ptr, sorted_pairs_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, h_ptr, first_row,
                          pid_n, H, I, K, P, stride_x, alpha, limit, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
                          WEIGHT_DESC, FMT, GROUP, VC, HAS_BIAS, ACT)
        elif TAIL_M == BLOCK_M // 2:
            _gate_up_tile(x_ptr, sorted_pairs_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, h_ptr, first_row,
                          pid_n, H, I, K, P, stride_x, alpha, limit, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION,
                          WEIGHT_DESC, FMT, GROUP, VC, HAS_BIAS, ACT)
        elif n_rows == BLOCK_M // 2:
            _gate_up_tile(x_ptr, sorted_pairs_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, h_ptr, first_row,
                          pid_n, H, I, K, P, stride_x, alpha, limit, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION,
                          WEIGHT_DESC, FMT, GROUP, VC, HAS_BIAS, ACT)
        else:
            _gate_up_tile(x_ptr, sorted_pairs_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, h_ptr, first_row,
                          pid_n, H, I, K, P, stride_x, alpha, limit, BLOCK_M // 4, BLOCK_N, BLOCK_K, PRECISION,
                          WEIGHT_DESC, FMT, GROUP, VC, HAS_BIAS, ACT)


@triton.jit
def _down_tile(
    h_ptr, sorted_pairs_ptr, weights_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, y_ptr, first_row, pid_n,
    H, I, P,
    BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    WEIGHT_DESC: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, VC: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # The expert's down [H, I] is at w_ptr, or (WEIGHT_DESC) rows w_row.. of w_desc, the arena seen
    # as rows of I elements; quantized formats: its codes at w_ptr, scales at sc_ptr, zero points at z_ptr;
    # its biases (HAS_BIAS) [H] at b_ptr.
    pairs = tl.load(sorted_pairs_ptr + first_row + tl.arange(0, BM))  # [BM]
    pair_ok = pairs < P
    safe_pairs = tl.where(pair_ok, pairs, 0).to(tl.int64)
    n0 = pid_n * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)  # [BN] output (hidden) rows
    row_ok = rows < H
    ks0 = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + safe_pairs[:, None] * I  # [BM, 1]
    acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    if FMT == FP8_BLOCK:
        srow = rows // GROUP
    else:
        srow = rows
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + ks0
        a = tl.load(h_rows + ks[None, :], mask=pair_ok[:, None] & (ks < I)[None, :], other=0.0)  # [BM, BK]
        if FMT != FLOAT:  # dequantized to h's dtype
            b = _weight_tile(w_ptr + rows[None, :].to(tl.int64) * (I * 16 // VC), ks, row_ok, I, sc_ptr, z_ptr,
                             srow, k0, h_ptr.dtype.element_ty, FMT, GROUP, VC)  # [BK, BN]
        elif WEIGHT_DESC:
            b = w_desc.load([w_row + n0, k0]).T  # [BK, BN]; rows past H: output columns never stored
        else:
            b = tl.load(w_ptr + rows[None, :].to(tl.int64) * I + ks[:, None],
                        mask=(ks < I)[:, None] & row_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if FMT == FP8 or FMT == INT8:
        acc *= tl.load(sc_ptr + srow, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    w = tl.load(weights_ptr + safe_pairs, mask=pair_ok, other=0.0).to(tl.float32)  # [BM]
    acc = acc * w[:, None]
    tl.store(y_ptr + safe_pairs[:, None] * H + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=pair_ok[:, None] & row_ok[None, :])


# P and num_blocks vary with the prompt (E with the model): not specialized on, so a new prompt length
# compiles nothing
@triton.jit(do_not_specialize=["P", "E", "num_blocks"])
def _prefill_down_kernel(
    h_ptr,  # [P, I] x.dtype
    sorted_pairs_ptr,  # [M_pad]
    blocks_ptr,  # [3, num_blocks]
    weights_ptr,  # [P] fp32
    table_ptr,  # [E] int32
    arena_ptr,  # [N, S] (float format), else the arena's bytes [N, slot_bytes]
    scale_ptr,  # quantized formats: the arena's bytes as fp32 [N, slot_bytes / 4]; float: unused
    w_desc,  # TMA descriptor of the arena (WEIGHT_DESC), else unused
    y_ptr,  # [P, H] x.dtype out: w * (down(h) + b_down) per pair
    bias_ptr,  # the arena in the model dtype [N, S]: down's biases [H] at element b_off of a slot
    H, I, P, E, num_blocks,
    stride_slot, stride_slot_f32, slot_rows, stride_bias,
    w_off, s_off, z_off,  # into a slot (units of arena_ptr: float elements, quantized bytes): down's weights,
    # scales, zero points
    b_off,
    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, WEIGHT_DESC: tl.constexpr, FMT: tl.constexpr,
    GROUP: tl.constexpr, VC: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
):
    # w_desc (WEIGHT_DESC): the arena as [N * slot_rows, I], slot_rows = S / I; down starts w_off / I rows into a
    # slot (the launcher checks that it is a whole number of rows)
    _pdl_wait(PDL)
    block, pid_n = _block_and_tile(num_blocks, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(blocks_ptr + block)
    if expert < E:
        first_row = tl.load(blocks_ptr + num_blocks + block)
        n_rows = tl.load(blocks_ptr + 2 * num_blocks + block)
        slot = tl.load(table_ptr + expert)
        if FMT == FLOAT:
            w_ptr = arena_ptr + slot.to(tl.int64) * stride_slot + w_off
            sc_ptr, z_ptr = w_ptr, w_ptr  # unused
        else:
            w_ptr, sc_ptr, z_ptr = _slot_parts(arena_ptr, scale_ptr, slot, stride_slot, stride_slot_f32,
                                               w_off, s_off, z_off, FMT)
        w_row = slot * slot_rows + w_off // I
        b_ptr = bias_ptr + slot.to(tl.int64) * stride_bias + b_off
        # one code path per block size (the constexpr tests drop the sizes this config never uses)
        if TAIL_M == BLOCK_M:
            _down_tile(h_ptr, sorted_pairs_ptr, weights_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, y_ptr,
                       first_row, pid_n, H, I, P, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, WEIGHT_DESC, FMT,
                       GROUP, VC, HAS_BIAS)
        elif n_rows == BLOCK_M:
            _down_tile(h_ptr, sorted_pairs_ptr, weights_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, y_ptr,
                       first_row, pid_n, H, I, P, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, WEIGHT_DESC, FMT,
                       GROUP, VC, HAS_BIAS)
        elif TAIL_M == BLOCK_M // 2:
            _down_tile(h_ptr, sorted_pairs_ptr, weights_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, y_ptr,
                       first_row, pid_n, H, I, P, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION, WEIGHT_DESC, FMT,
                       GROUP, VC, HAS_BIAS)
        elif n_rows == BLOCK_M // 2:
            _down_tile(h_ptr, sorted_pairs_ptr, weights_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, y_ptr,
                       first_row, pid_n, H, I, P, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION, WEIGHT_DESC, FMT,
                       GROUP, VC, HAS_BIAS)
        else:
            _down_tile(h_ptr, sorted_pairs_ptr, weights_ptr, w_ptr, w_desc, w_row, sc_ptr, z_ptr, b_ptr, y_ptr,
                       first_row, pid_n, H, I, P, BLOCK_M // 4, BLOCK_N, BLOCK_K, PRECISION, WEIGHT_DESC, FMT,
                       GROUP, VC, HAS_BIAS)


@triton.jit
def _sum_pairs_kernel(
    y_ptr,  # [P, H] x.dtype
    ids_ptr,  # [P]
    table_ptr,  # [E] int32
    out_ptr,  # [T, H]
    H,
    stride_out,
    K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_wait(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    # K unrolled with masks instead of branches, so the K row loads are in flight together
    for k in tl.static_range(K):
        pair = token * K + k
        slot = tl.load(table_ptr + tl.load(ids_ptr + pair))
        h_end = tl.where(slot >= 0, H, 0)  # rows of non-resident pairs were never written: not read
        acc += tl.load(y_ptr + pair.to(tl.int64) * H + cols, mask=cols < h_end, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < H)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
# Triton decides at decoration time whether a kernel is compiled or interpreted, so what counts
# is the environment when this module was imported, not now.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _check_inputs(x, topk_ids, topk_weights, slot_table, arena, layout, out) -> None:
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"fused_moe runs Triton kernels and x is on {x.device}: use a CUDA device, or set TRITON_INTERPRET=1 "
            "before moerun.kernels.fused_moe is first imported to run them (slowly) on the CPU"
        )
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}; flatten batch and sequence first")
    tokens, hidden = x.shape
    if x.dtype not in _DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; fused_moe supports {_DTYPES}")
    if arena.dtype != x.dtype:
        raise TypeError(f"arena dtype {arena.dtype} differs from x dtype {x.dtype}; cast x to the model dtype")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise ValueError(f"topk_ids must be [T={tokens}, K], got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must match topk_ids {tuple(topk_ids.shape)}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}; pass weights.float()")
    if slot_table.dim() != 1 or slot_table.dtype != torch.int32:
        raise TypeError(
            f"slot_table must be one layer's int32 row [E], got {slot_table.dtype} {tuple(slot_table.shape)}"
        )
    if arena.dim() != 2:
        raise ValueError(f"arena must be [num_slots, slot_elems], got shape {tuple(arena.shape)}")
    if not hasattr(layout, "slot_elems"):
        raise TypeError(f"layout must be a SlotLayout (moerun.native.slot_layout(dtype, H, I, format)), got "
                        f"{type(layout).__name__}")
    if layout.hidden_size != hidden:
        raise ValueError(f"x has H={hidden} but the slot layout is for hidden_size={layout.hidden_size}")
    if layout.dtype != x.dtype:
        raise TypeError(f"the slot layout is for {layout.dtype} but x is {x.dtype}; cast x to the model dtype")
    if arena.shape[1] != layout.slot_elems:
        raise ValueError(
            f"arena slots hold {arena.shape[1]} elements but the slot layout's slots are {layout.slot_elems} "
            f"({layout.format}, H={hidden}, I={layout.inter_size}); the arena must be made from this layout"
        )
    if x.stride(1) != 1 or arena.stride(1) != 1:
        raise ValueError("x and arena must be contiguous along their last dimension (call .contiguous())")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("slot_table", slot_table),
                    ("arena", arena)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")
    if out is not None:
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"out must be [T, H] {x.dtype} on {x.device} like x, got {tuple(out.shape)} {out.dtype} {out.device}"
            )
        if out.stride(1) != 1:
            raise ValueError("out must be contiguous along its last dimension")


# The kernels' codes of the formats' kinds, in the native order (SlotLayout.kind, moerun.native.FORMAT_KINDS;
# tests/kernels/test_fused_moe.py ties them): a kind not here has no kernel.
KERNEL_KINDS = {"float": FLOAT, "fp8": FP8, "fp8-block": FP8_BLOCK, "int8": INT8, "int4": INT4, "mxfp4": MXFP4}
_KERNEL_CODES = frozenset(code.value for code in KERNEL_KINDS.values())


class _Slots(NamedTuple):
    """What the kernels take of an arena in a layout: the arena (float: as it is; quantized: its bytes),
    the same memory as fp32 (quantized formats' scales), their row strides, and the format's code."""

    arena: torch.Tensor  # [N, S] model dtype (float), [N, slot_bytes] uint8 (quantized)
    scales: torch.Tensor  # [N, slot_bytes / 4] fp32 view (quantized); the arena itself (float, unused)
    stride: int
    stride_f32: int
    fmt: int
    group: int
    vc: int  # quantized: columns per 16-byte vector of codes (16: 8-bit, 32: 4-bit); float: 0


def _slots(arena: torch.Tensor, layout) -> _Slots:
    fmt = layout.kind
    if fmt not in _KERNEL_CODES:
        raise NotImplementedError(f"fused_moe has no kernel for expert format {layout.format!r} (kind {fmt}; "
                                  f"kernels/fused_moe.py KERNEL_KINDS: {', '.join(KERNEL_KINDS)})")
    if not layout.quantized:
        return _Slots(arena, arena, arena.stride(0), 0, fmt, 0, 0)
    raw = arena.view(torch.uint8)  # [N, slot_bytes]
    f32 = raw.view(torch.float32)  # slot_bytes and every scale offset are multiples of 16
    return _Slots(raw, f32, raw.stride(0), f32.stride(0), fmt, layout.group_size, 128 // layout.weight_bits)


# The kernels' codes of the expert activations, in the native order (moerun.native.EXPERT_ACTIVATIONS;
# tests/kernels/test_fused_moe.py ties them).
KERNEL_ACTIVATIONS = {"silu": SILU, "swiglu_clamped": SWIGLU_CLAMPED}


class _Activation(NamedTuple):
    """What the kernels take of an expert activation: its code (a constexpr) and its two scalars."""

    code: int
    alpha: float
    limit: float


def _activation(activation) -> _Activation:
    """None (silu) or an ExpertActivation (moerun.models.base: name, alpha, limit) as the kernels take it."""
    if activation is None:
        return _Activation(SILU.value, 1.0, 0.0)
    name = activation.name
    if name not in KERNEL_ACTIVATIONS:
        raise ValueError(f"fused_moe has no kernel for expert activation {name!r}; the activations are "
                         f"{', '.join(KERNEL_ACTIVATIONS)}")
    alpha, limit = float(activation.alpha), float(activation.limit)
    if name == "swiglu_clamped" and not (alpha > 0 and 0 < limit < float("inf")):
        raise ValueError(f"swiglu_clamped needs a positive alpha and a positive finite limit (gpt-oss: alpha 1.702, "
                         f"limit config.swiglu_limit), got alpha {alpha} and limit {limit}")
    return _Activation(KERNEL_ACTIVATIONS[name].value, alpha, limit)


def _bias_args(arena: torch.Tensor, layout, matrix: str) -> tuple:
    """(the arena in the model dtype, its slot stride and the bias's element offset in a slot) of one
    matrix's biases; the offsets are 16-byte aligned, so whole elements of any model dtype."""
    return arena, arena.stride(0), getattr(layout, f"{matrix}_bias_offset") // arena.element_size()


def _part_offsets(layout, slots: _Slots, matrix: str) -> tuple[int, int, int]:
    """Offsets in a slot of one matrix's weights, scales and zero points (0 where the format has none), in
    the units of the arena the kernels take (``slots.arena``: model-dtype elements for the float format,
    bytes for a quantized one); the layout's parts are 16-byte aligned, so whole elements of any dtype."""
    elem = slots.arena.element_size()
    return (getattr(layout, f"{matrix}_offset") // elem, getattr(layout, f"{matrix}_scales_offset") // elem,
            getattr(layout, f"{matrix}_zeros_offset") // elem)


def _check_config(layout, slots: _Slots, cfg) -> None:
    """The constraints a quantized format puts on a launch config (configs are data: say which one broke)."""
    if not slots.vc:
        return
    if isinstance(cfg, DecodeConfig):
        for name in ("block_h", "block_i"):
            if getattr(cfg, name) % slots.vc:
                raise ValueError(f"decode {name}={getattr(cfg, name)} must be a multiple of {slots.vc} for "
                                 f"{layout.format} (16 bytes of codes a vector)")
    elif slots.group:
        for name in ("gate_up", "down"):
            block_k = getattr(cfg, name).block_k
            if block_k > slots.group or slots.group % block_k:
                raise ValueError(f"prefill {name}.block_k={block_k} must divide {layout.format}'s group of "
                                 f"{slots.group} (one scale per column a step)")


def _fused_moe_decode(x, ids, weights, slot_table, arena, layout, out, cfg, act: _Activation) -> None:
    tokens, hidden = x.shape
    inter_size = layout.inter_size
    top_k = ids.shape[1]
    pairs = tokens * top_k
    slots = _slots(arena, layout)
    _check_config(layout, slots, cfg)
    h = torch.empty((pairs, inter_size), dtype=torch.float32, device=x.device)  # [P, I]
    pdl = _pdl(x.device)
    fmt = dict(FMT=slots.fmt, GROUP=slots.group, VC=slots.vc)
    bias = dict(HAS_BIAS=layout.has_bias)
    gu_bias, stride_bias, gu_b_off = _bias_args(arena, layout, "gate_up")
    _decode_gate_up_kernel[(pairs, triton.cdiv(inter_size, cfg.block_n))](
        x, ids, slot_table, slots.arena, slots.scales, h, gu_bias,
        hidden, inter_size, top_k, x.stride(0), slots.stride, slots.stride_f32, stride_bias,
        *_part_offsets(layout, slots, "gate_up"), gu_b_off, act.alpha, act.limit,
        BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps, ACT=act.code, **bias, **fmt, **pdl,
    )
    dn_bias, stride_bias, dn_b_off = _bias_args(arena, layout, "down")
    _decode_down_kernel[(tokens, triton.cdiv(hidden, cfg.block_out))](
        h, ids, weights, slot_table, slots.arena, slots.scales, out, dn_bias,
        hidden, inter_size, out.stride(0), slots.stride, slots.stride_f32, stride_bias,
        *_part_offsets(layout, slots, "down"), dn_b_off,
        K=top_k, BLOCK_OUT=cfg.block_out, BLOCK_I=cfg.block_i, num_warps=cfg.num_warps, **bias, **fmt, **pdl,
    )


class PairBlocks(NamedTuple):
    """(token, expert) pairs grouped into blocks of one expert each (``sort_pairs_by_expert``)."""

    sorted_pairs: torch.Tensor  # [M_pad] int32: pair index t*K+k at its sorted row; P marks padding
    blocks: torch.Tensor  # [3, num_blocks] int32: expert (E = no work), first sorted row, rows


def sort_pairs_by_expert(
    topk_ids: torch.Tensor, slot_table: torch.Tensor, block_m: int, tail_m: int | None = None
) -> PairBlocks:
    """Group the (token, expert) pairs of resident experts into blocks of pairs of one expert.

    An expert's pairs fill ``block_m``-row blocks; the rest, rounded up to ``tail_m`` rows (``block_m``
    by default, or half or a quarter of it), takes one block per size it needs among block_m/2 and
    block_m/4. Blocks are in expert order, then unused ones (expert E). Two launches, no host sync,
    output sizes that depend on T, K, E alone (graph-capturable). Pairs of non-resident experts are
    left out. The order of pairs within an expert's blocks is not fixed.
    """
    tail_m = block_m if tail_m is None else tail_m
    num_tails = short_block_sizes(block_m, tail_m)
    num_experts = slot_table.shape[0]
    flat = topk_ids.reshape(-1)  # [P]
    num_pairs = flat.numel()
    # beyond its full blocks, an expert has one block per short size (or one more full block)
    num_blocks = num_pairs // block_m + num_experts * max(1, num_tails)
    max_padded = num_pairs + num_experts * (tail_m - 1)  # an expert's padding is under tail_m rows
    cursor = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    blocks = torch.empty((3, num_blocks), dtype=torch.int32, device=flat.device)
    sorted_pairs = torch.empty(max_padded, dtype=torch.int32, device=flat.device)
    e_pad = triton.next_power_of_2(num_experts + 1)
    pdl = _pdl(flat.device)
    _expert_blocks_kernel[(1,)](
        flat, slot_table, cursor, blocks, sorted_pairs, num_pairs, num_experts, num_blocks,
        E_PAD=e_pad, BLOCK_M=block_m, TAIL_M=tail_m, NUM_TAILS=num_tails, CHUNK=COUNT_CHUNK, CHUNK_B=256,
        CHUNK_J=min(tail_m, max(1, 8192 // e_pad)), num_warps=8, **pdl,
    )
    _scatter_pairs_kernel[(triton.cdiv(num_pairs, SORT_CHUNK),)](
        flat, slot_table, cursor, sorted_pairs, num_pairs, CHUNK=SORT_CHUNK, num_warps=4, **pdl,
    )
    return PairBlocks(sorted_pairs, blocks)


def _weight_descriptors(arena, layout, cfg) -> tuple:
    """TMA descriptors of the arena as rows of H (gate_up) and rows of I (down) elements, for the
    GEMMs whose tile asks for them and where the layout allows (each part starting on a row of its own
    width); None where pointer loads are used."""
    hidden, inter = layout.hidden_size, layout.inter_size
    # the interpreter runs them too (CI checks the row arithmetic without a GPU)
    if not (cfg.gate_up.tma or cfg.down.tma) or not (INTERPRETED or _sm90_or_later(arena.device)):
        return None, None
    slot_elems, elem = arena.shape[1], arena.element_size()
    aligned = (arena.data_ptr() % 16 == 0 and arena.stride(0) == slot_elems
               and slot_elems % hidden == 0 and slot_elems % inter == 0
               and (hidden * elem) % 16 == 0 and (inter * elem) % 16 == 0
               and layout.gate_up_offset % (hidden * elem) == 0 and layout.down_offset % (inter * elem) == 0)
    if not aligned:
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = arena.view(-1)
    gate_up = (TensorDescriptor.from_tensor(rows.view(-1, hidden), [cfg.gate_up.block_n, cfg.gate_up.block_k])
               if cfg.gate_up.tma else None)
    down = (TensorDescriptor.from_tensor(rows.view(-1, inter), [cfg.down.block_n, cfg.down.block_k])
            if cfg.down.tma else None)
    return gate_up, down


@functools.lru_cache(maxsize=None)
def _sm90_or_later(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _pdl(device: torch.device) -> dict:
    """Launch options for programmatic dependent launch (Hopper and later, compiled kernels): each
    kernel starts while the previous one drains and waits in ``_pdl_wait``. Inside
    a CUDA graph the launches keep the attribute as programmatic edges."""
    if INTERPRETED or not _sm90_or_later(device):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


def _fused_moe_prefill(x, ids, weights, slot_table, arena, layout, out, cfg, act: _Activation) -> None:
    tokens, hidden = x.shape
    inter_size = layout.inter_size
    slots = _slots(arena, layout)
    _check_config(layout, slots, cfg)
    top_k = ids.shape[1]
    pairs = tokens * top_k
    num_experts = slot_table.shape[0]
    # fp32 models get full fp32 products (as torch's default matmul does), not tf32
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    sorted_pairs, blocks = sort_pairs_by_expert(ids, slot_table, cfg.block_m, cfg.tail_m)
    num_blocks = blocks.shape[1]
    # h by pair, not by sorted row: M_pad rows would be up to E * (tail_m - 1) more, MBs for a short
    # prompt, which the memory plan's activation estimate does not hold
    h = torch.empty((pairs, inter_size), dtype=x.dtype, device=x.device)  # [P, I]
    # per-pair outputs in the model dtype, summed in fp32 by the last kernel (fp32 here would double
    # the bytes of what is, at K = 8, the largest intermediate)
    y = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)  # [P, H]
    # weight tiles by TMA are for the float format only (a quantized slot's parts are not rows of H or I)
    gu_desc, down_desc = (None, None) if layout.quantized else _weight_descriptors(arena, layout, cfg)
    slot_elems = arena.shape[1]
    pdl = _pdl(x.device)
    fmt = dict(FMT=slots.fmt, GROUP=slots.group, VC=slots.vc)
    bias = dict(HAS_BIAS=layout.has_bias)
    gu = cfg.gate_up
    gu_bias, stride_bias, gu_b_off = _bias_args(arena, layout, "gate_up")
    _prefill_gate_up_kernel[(num_blocks * triton.cdiv(inter_size, gu.block_n),)](
        x, sorted_pairs, blocks, slot_table, slots.arena, slots.scales,
        gu_desc if gu_desc is not None else slots.arena, h, gu_bias,
        hidden, inter_size, top_k, pairs, num_experts, num_blocks, x.stride(0), slots.stride, slots.stride_f32,
        slot_elems // hidden, stride_bias, *_part_offsets(layout, slots, "gate_up"), gu_b_off, act.alpha, act.limit,
        BLOCK_M=cfg.block_m, TAIL_M=cfg.tail_m, BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, GROUP_M=gu.group_m,
        PRECISION=precision, WEIGHT_DESC=gu_desc is not None, num_warps=gu.num_warps, num_stages=gu.num_stages,
        ACT=act.code, **bias, **fmt, **pdl,
    )
    dn = cfg.down
    dn_bias, stride_bias, dn_b_off = _bias_args(arena, layout, "down")
    _prefill_down_kernel[(num_blocks * triton.cdiv(hidden, dn.block_n),)](
        h, sorted_pairs, blocks, weights, slot_table, slots.arena, slots.scales,
        down_desc if down_desc is not None else slots.arena, y, dn_bias,
        hidden, inter_size, pairs, num_experts, num_blocks, slots.stride, slots.stride_f32,
        slot_elems // inter_size, stride_bias, *_part_offsets(layout, slots, "down"), dn_b_off,
        BLOCK_M=cfg.block_m, TAIL_M=cfg.tail_m, BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, GROUP_M=dn.group_m,
        PRECISION=precision, WEIGHT_DESC=down_desc is not None, num_warps=dn.num_warps, num_stages=dn.num_stages,
        **bias, **fmt, **pdl,
    )
    _sum_pairs_kernel[(tokens, triton.cdiv(hidden, cfg.sum_block_h))](
        y, ids, slot_table, out, hidden, out.stride(0), K=top_k, BLOCK_H=cfg.sum_block_h,
        num_warps=max(1, min(8, cfg.sum_block_h // 256)), **pdl,
    )


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_table: torch.Tensor,
    arena: torch.Tensor,
    layout,
    out: torch.Tensor | None = None,
    activation=None,
    *,
    config: FusedMoeConfig | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """Sum over each token's resident experts of ``w * down(act(gate(x), up(x)))``, each projection plus its
    bias when the layout holds biases.

    Args:
        x: [T, H] bf16/fp16/fp32 token activations.
        topk_ids: [T, K] int32/int64 chosen experts.
        topk_weights: [T, K] fp32 gate weights.
        slot_table: [E] int32, this layer's row of the slot table (-1 = not resident), on x's device.
        arena: [N, S] expert slots of ``layout.slot_elems`` elements, same dtype as x (quantized
            formats: read as the slots' bytes).
        layout: the arena's SlotLayout (``moerun.native.slot_layout(dtype, H, I, format)``): H, I, the
            model dtype, the expert format and where each part of a slot sits.
        out: optional [T, H] output in x.dtype (every element is written).
        activation: the experts' activation, None (silu) or an ExpertActivation (moerun.models.base:
            name, alpha, limit); the biases come with the layout (``layout.has_bias``).
        config: launch parameters; default: the tuned table for this device, (H, I) and format (fp32:
            the format's defaults).
        path: ``"decode"`` or ``"prefill"`` to force a path; default: by T.
    Returns:
        [T, H] in x.dtype; pairs whose expert is not resident contribute zero.
    """
    _check_inputs(x, topk_ids, topk_weights, slot_table, arena, layout, out)
    act = _activation(activation)
    if out is None:
        out = torch.empty_like(x)
    tokens, hidden = x.shape
    if tokens == 0:
        return out
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    cfg = config if config is not None else get_config(x.device, hidden, layout.inter_size, x.dtype, layout.format)
    if path is None:
        path = "decode" if tokens <= DECODE_MAX_TOKENS else "prefill"
    if path == "decode":
        _fused_moe_decode(x, ids, weights, slot_table, arena, layout, out, cfg.decode, act)
    elif path == "prefill":
        _fused_moe_prefill(x, ids, weights, slot_table, arena, layout, out, cfg.prefill, act)
    else:
        raise ValueError(f"path must be 'decode', 'prefill' or None, got {path!r}")
    return out
