"""Fused MoE over experts held in arena slots: y[t] = sum_k w[t,k] * down(silu(gate(x[t])) * up(x[t])).

Notation: T tokens, K experts per token, P = T*K (token, expert) pairs, E experts in the layer,
H hidden size, I expert intermediate size, N arena slots, S slot elements.

An expert is one slot row of the arena: gate_up [2I, H] (gate rows first) at element 0, down [H, I]
at element 2*I*H. The slot of expert e is ``slot_table[e]`` (-1 = not resident); the kernels read
it on the device, so one launch serves any placement and the launch is graph-capturable. Pairs
whose expert is not resident contribute nothing here (the CPU path adds them).

Two paths, chosen by T (``DECODE_MAX_TOKENS``):
- decode: weight-streaming GEMV. Kernel 1, one program per (pair, block of I rows), streams gate
  and up rows once and writes h = silu(g) * u in fp32. Kernel 2, one program per (token, block of
  H rows), streams down rows for each of the token's resident experts and reduces the
  gate-weighted sum in registers, writing the output once.
- prefill: pairs grouped by expert into blocks of BLOCK_M pairs of one expert (padding marked
  with the sentinel P; two small kernels: per-expert counts and block table, then an atomic
  scatter), then a grouped GEMM with tl.dot for gate_up (+ SiLU*mul) and for down (+ gate weight,
  one row per pair, in the model dtype), and a last kernel that sums each token's K rows in fp32.

This module knows nothing about which experts should be resident or how they got there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fused_moe_config import DECODE_MAX_TOKENS, FusedMoeConfig, get_config

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SORT_CHUNK = 1024  # pairs per step of the expert-grouping kernels


# --------------------------------------------------------------------------------------------
# decode path: weight streaming
# --------------------------------------------------------------------------------------------
@triton.jit
def _decode_gate_up_kernel(
    x_ptr,  # [T, H]
    ids_ptr,  # [P] expert id of each pair
    table_ptr,  # [E] int32 slot of each expert, -1 = not resident
    arena_ptr,  # [N, S]
    h_ptr,  # [P, I] fp32 out: silu(gate) * up
    H, I, K,
    stride_x, stride_slot,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair)
    slot = tl.load(table_ptr + expert)
    if slot >= 0:
        token = pair // K
        gate_base = arena_ptr + slot.to(tl.int64) * stride_slot
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
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + pair.to(tl.int64) * I + rows, h, mask=row_ok)


@triton.jit
def _decode_down_kernel(
    h_ptr,  # [P, I] fp32
    ids_ptr,  # [P]
    weights_ptr,  # [P] fp32 gate weights
    table_ptr,  # [E] int32
    arena_ptr,  # [N, S]
    out_ptr,  # [T, H]
    H, I,
    stride_out, stride_slot,
    K: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_I: tl.constexpr,
):
    token = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # [BO] output (hidden) rows
    row_ok = rows < H
    cols0 = tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_OUT, BLOCK_I), dtype=tl.float32)
    down_off = 2 * I.to(tl.int64) * H
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + cols0
        # K unrolled with masks instead of branches, so the loads of all K experts are in flight at once;
        # a non-resident expert's loads are fully masked (no memory traffic).
        for k in tl.static_range(K):
            pair = token * K + k
            slot = tl.load(table_ptr + tl.load(ids_ptr + pair))
            i_end = tl.where(slot >= 0, I, 0)  # a non-resident expert masks every column
            w = tl.load(weights_ptr + pair).to(tl.float32)
            down_rows = arena_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_slot + down_off \
                + rows[:, None].to(tl.int64) * I  # [BO, 1]
            cols_k_ok = cols < i_end
            hv = tl.load(h_ptr + pair.to(tl.int64) * I + cols, mask=cols_k_ok, other=0.0) * w  # [BI]
            wd = tl.load(down_rows + cols[None, :], mask=row_ok[:, None] & cols_k_ok[None, :], other=0.0)
            acc += wd.to(tl.float32) * hv[None, :]
    y = tl.sum(acc, axis=1)  # [BO]
    tl.store(out_ptr + token * stride_out + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


# --------------------------------------------------------------------------------------------
# prefill path: pairs grouped by expert, then a grouped GEMM
# --------------------------------------------------------------------------------------------
@triton.jit
def _expert_blocks_kernel(
    ids_ptr,  # [P] expert id of each pair
    table_ptr,  # [E] int32 slot of each expert, -1 = not resident
    cursor_ptr,  # [E] int32 out: first padded row of each expert (the scatter's atomic cursors)
    block_expert_ptr,  # [num_blocks] int32 out: expert of each block, E = no work
    sorted_pairs_ptr,  # [M_pad] int32 out: filled with the sentinel P
    P, E, num_blocks, M_pad,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, CHUNK_B: tl.constexpr,
):
    # One program: counts are a few thousand pairs into <= a few hundred bins, cheaper in one
    # program than a second launch to combine partial histograms.
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
    blocks = tl.where(is_expert, (counts + BLOCK_M - 1) // BLOCK_M, 0)  # [E_PAD]
    block_end = tl.cumsum(blocks, 0)  # exclusive end block of each expert
    tl.store(cursor_ptr + bins, (block_end - blocks) * BLOCK_M, mask=is_expert)
    # block b belongs to the first expert whose blocks end after b (experts with none are skipped)
    for b0 in range(0, num_blocks, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)  # [CB]
        ended = (block_end[None, :] <= b[:, None]) & is_expert[None, :]  # [CB, E_PAD]
        tl.store(block_expert_ptr + b, tl.sum(ended.to(tl.int32), axis=1), mask=b < num_blocks)
    for r0 in range(0, M_pad, CHUNK):
        r = r0 + tl.arange(0, CHUNK)
        tl.store(sorted_pairs_ptr + r, P, mask=r < M_pad)


@triton.jit
def _scatter_pairs_kernel(
    ids_ptr,  # [P]
    table_ptr,  # [E] int32
    cursor_ptr,  # [E] int32: next free row of each expert
    sorted_pairs_ptr,  # [M_pad] int32 out: pair index at its row
    P,
    CHUNK: tl.constexpr,
):
    # Rows within an expert come in atomic order, which varies run to run; results do not: a GEMM
    # row depends only on its own pair, and the last kernel sums each token's pairs in k order.
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ok = offs < P
    e = tl.load(ids_ptr + offs, mask=ok, other=0)
    slot = tl.load(table_ptr + e, mask=ok, other=-1)
    take = ok & (slot >= 0)
    row = tl.atomic_add(cursor_ptr + e, 1, mask=take)
    tl.store(sorted_pairs_ptr + row, offs, mask=take)


@triton.jit
def _prefill_gate_up_kernel(
    x_ptr,  # [T, H]
    sorted_pairs_ptr,  # [M_pad] pair index, P = padding
    block_expert_ptr,  # [num_blocks] expert of each block of BLOCK_M pairs, E = no work
    table_ptr,  # [E] int32
    arena_ptr,  # [N, S]
    h_ptr,  # [P, I] x.dtype out: silu(gate) * up
    H, I, K, P, E,
    stride_x, stride_slot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < E:
        slot = tl.load(table_ptr + expert)
        sorted_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pairs = tl.load(sorted_pairs_ptr + sorted_rows)
        pair_ok = pairs < P
        tokens = tl.where(pair_ok, pairs // K, 0)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] intermediate rows
        row_ok = rows < I
        ks0 = tl.arange(0, BLOCK_K)
        gate_base = arena_ptr + slot.to(tl.int64) * stride_slot
        # B tiles are W^T: [BK, BN] with the H index along dim 0
        gate_cols = gate_base + rows[None, :].to(tl.int64) * H  # [1, BN]
        up_cols = gate_cols + I.to(tl.int64) * H
        x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_x  # [BM, 1]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + ks0
            k_ok = ks < H
            a = tl.load(x_rows + ks[None, :], mask=pair_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            bmask = k_ok[:, None] & row_ok[None, :]
            bg = tl.load(gate_cols + ks[:, None], mask=bmask, other=0.0)  # [BK, BN]
            bu = tl.load(up_cols + ks[:, None], mask=bmask, other=0.0)
            acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
        h = acc_g * tl.sigmoid(acc_g) * acc_u  # [BM, BN]
        out = h_ptr + pairs[:, None].to(tl.int64) * I + rows[None, :]
        tl.store(out, h.to(h_ptr.dtype.element_ty), mask=pair_ok[:, None] & row_ok[None, :])


@triton.jit
def _prefill_down_kernel(
    h_ptr,  # [P, I] x.dtype
    sorted_pairs_ptr,  # [M_pad]
    block_expert_ptr,  # [num_blocks]
    weights_ptr,  # [P] fp32
    table_ptr,  # [E] int32
    arena_ptr,  # [N, S]
    y_ptr,  # [P, H] x.dtype out: w * down(h) per pair
    H, I, P, E,
    stride_slot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < E:
        slot = tl.load(table_ptr + expert)
        sorted_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pairs = tl.load(sorted_pairs_ptr + sorted_rows)
        pair_ok = pairs < P
        safe_pairs = tl.where(pair_ok, pairs, 0).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output (hidden) rows
        row_ok = rows < H
        ks0 = tl.arange(0, BLOCK_K)
        down_cols = arena_ptr + slot.to(tl.int64) * stride_slot + 2 * I.to(tl.int64) * H \
            + rows[None, :].to(tl.int64) * I  # [1, BN]
        h_rows = h_ptr + safe_pairs[:, None] * I  # [BM, 1]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + ks0
            k_ok = ks < I
            a = tl.load(h_rows + ks[None, :], mask=pair_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            b = tl.load(down_cols + ks[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)  # [BK, BN]
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        w = tl.load(weights_ptr + safe_pairs, mask=pair_ok, other=0.0).to(tl.float32)  # [BM]
        acc = acc * w[:, None]
        tl.store(y_ptr + safe_pairs[:, None] * H + rows[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=pair_ok[:, None] & row_ok[None, :])


@triton.jit
def _sum_pairs_kernel(
    y_ptr,  # [P, H] x.dtype
    ids_ptr,  # [P]
    table_ptr,  # [E] int32
    out_ptr,  # [T, H]
    H, K,
    stride_out,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(0, K):
        pair = token * K + k
        slot = tl.load(table_ptr + tl.load(ids_ptr + pair))
        if slot >= 0:  # rows of non-resident pairs were never written
            acc += tl.load(y_ptr + pair.to(tl.int64) * H + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
# Triton decides at decoration time whether a kernel is compiled or interpreted, so what counts
# is the environment when this module was imported, not now.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _check_inputs(x, topk_ids, topk_weights, slot_table, arena, inter_size, out) -> None:
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
    if inter_size <= 0:
        raise ValueError(f"inter_size must be positive, got {inter_size}")
    if arena.shape[1] < 3 * inter_size * hidden:
        raise ValueError(
            f"arena slots hold {arena.shape[1]} elements but an expert of H={hidden}, I={inter_size} "
            f"needs 3*I*H = {3 * inter_size * hidden}; check inter_size and the arena's slot_elems"
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


def _fused_moe_decode(x, ids, weights, slot_table, arena, inter_size, out, cfg) -> None:
    tokens, hidden = x.shape
    top_k = ids.shape[1]
    pairs = tokens * top_k
    h = torch.empty((pairs, inter_size), dtype=torch.float32, device=x.device)  # [P, I]
    _decode_gate_up_kernel[(pairs, triton.cdiv(inter_size, cfg.block_n))](
        x, ids, slot_table, arena, h,
        hidden, inter_size, top_k, x.stride(0), arena.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
    )
    _decode_down_kernel[(tokens, triton.cdiv(hidden, cfg.block_out))](
        h, ids, weights, slot_table, arena, out,
        hidden, inter_size, out.stride(0), arena.stride(0),
        K=top_k, BLOCK_OUT=cfg.block_out, BLOCK_I=cfg.block_i, num_warps=cfg.num_warps,
    )


def sort_pairs_by_expert(
    topk_ids: torch.Tensor, slot_table: torch.Tensor, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, expert) pairs of resident experts into blocks of ``block_m`` pairs of one expert.

    Two launches, no host sync, output sizes that depend on T, K, E alone (graph-capturable).
    Returns ``sorted_pairs`` [M_pad] int32 (pair index t*K+k; P marks padding) and
    ``block_expert`` [M_pad / block_m] int32 (E marks a block with no work). Pairs of
    non-resident experts are left out. The order of pairs within an expert's blocks is not fixed.
    """
    num_experts = slot_table.shape[0]
    flat = topk_ids.reshape(-1)  # [P]
    num_pairs = flat.numel()
    max_padded = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    num_blocks = max_padded // block_m
    cursor = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    sorted_pairs = torch.empty(max_padded, dtype=torch.int32, device=flat.device)
    e_pad = triton.next_power_of_2(num_experts + 1)
    _expert_blocks_kernel[(1,)](
        flat, slot_table, cursor, block_expert, sorted_pairs, num_pairs, num_experts, num_blocks, max_padded,
        E_PAD=e_pad, BLOCK_M=block_m, CHUNK=SORT_CHUNK, CHUNK_B=max(1, 8192 // e_pad), num_warps=4,
    )
    _scatter_pairs_kernel[(triton.cdiv(num_pairs, SORT_CHUNK),)](
        flat, slot_table, cursor, sorted_pairs, num_pairs, CHUNK=SORT_CHUNK, num_warps=4,
    )
    return sorted_pairs, block_expert


def _fused_moe_prefill(x, ids, weights, slot_table, arena, inter_size, out, cfg) -> None:
    tokens, hidden = x.shape
    top_k = ids.shape[1]
    pairs = tokens * top_k
    num_experts = slot_table.shape[0]
    # fp32 models get full fp32 products (as torch's default matmul does), not tf32
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    sorted_pairs, block_expert = sort_pairs_by_expert(ids, slot_table, cfg.block_m)
    num_blocks = block_expert.shape[0]
    # h by pair, not by sorted row: M_pad rows would be up to E * (block_m - 1) more, tens of MB for a
    # short prompt, which the memory plan's activation estimate does not hold
    h = torch.empty((pairs, inter_size), dtype=x.dtype, device=x.device)  # [P, I]
    # per-pair outputs in the model dtype, summed in fp32 by the last kernel (fp32 here would double
    # the bytes of what is, at K = 8, the largest intermediate)
    y = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)  # [P, H]
    _prefill_gate_up_kernel[(num_blocks, triton.cdiv(inter_size, cfg.block_n))](
        x, sorted_pairs, block_expert, slot_table, arena, h,
        hidden, inter_size, top_k, pairs, num_experts, x.stride(0), arena.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _prefill_down_kernel[(num_blocks, triton.cdiv(hidden, cfg.block_n))](
        h, sorted_pairs, block_expert, weights, slot_table, arena, y,
        hidden, inter_size, pairs, num_experts, arena.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    block_h = 512
    _sum_pairs_kernel[(tokens, triton.cdiv(hidden, block_h))](
        y, ids, slot_table, out, hidden, top_k, out.stride(0), BLOCK_H=block_h,
    )


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot_table: torch.Tensor,
    arena: torch.Tensor,
    inter_size: int,
    out: torch.Tensor | None = None,
    *,
    config: FusedMoeConfig | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """Sum over each token's resident experts of ``w * down(silu(gate(x)) * up(x))``.

    Args:
        x: [T, H] bf16/fp16/fp32 token activations.
        topk_ids: [T, K] int32/int64 chosen experts.
        topk_weights: [T, K] fp32 gate weights.
        slot_table: [E] int32, this layer's row of the slot table (-1 = not resident), on x's device.
        arena: [N, S] expert slots, same dtype as x (slot layout in the module docstring).
        inter_size: I, the expert intermediate size.
        out: optional [T, H] output in x.dtype (every element is written).
        config: launch parameters; default: the tuned table for this device and (H, I).
        path: ``"decode"`` or ``"prefill"`` to force a path; default: by T.
    Returns:
        [T, H] in x.dtype; pairs whose expert is not resident contribute zero.
    """
    _check_inputs(x, topk_ids, topk_weights, slot_table, arena, inter_size, out)
    if out is None:
        out = torch.empty_like(x)
    tokens, hidden = x.shape
    if tokens == 0:
        return out
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    cfg = config if config is not None else get_config(x.device, hidden, inter_size)
    if path is None:
        path = "decode" if tokens <= DECODE_MAX_TOKENS else "prefill"
    if path == "decode":
        _fused_moe_decode(x, ids, weights, slot_table, arena, inter_size, out, cfg.decode)
    elif path == "prefill":
        _fused_moe_prefill(x, ids, weights, slot_table, arena, inter_size, out, cfg.prefill)
    else:
        raise ValueError(f"path must be 'decode', 'prefill' or None, got {path!r}")
    return out
