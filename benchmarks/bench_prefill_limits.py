"""What bounds the prefill GEMMs: the same 2048-token prefill under conditions that remove one cost at a
time, and the weight reads alone.

For each shape (every expert resident, the tuned config):
- ``routing``: kernel times with random routing (as bench_kernels), with routing whose per-expert
  counts are whole 128-row blocks (no padding rows), and with all pairs on K experts (their weights
  stay in L2: the GEMMs without HBM weight traffic, i.e. near their compute rate).
- ``stream``: every expert's gate_up, then down, weights read by a no-compute Triton kernel with
  the GEMM's own TMA tile ([block_n, block_k], one program per expert and row tile, over all of K),
  and with a [64, 256] tile (512 contiguous bytes a row): the HBM time of the GEMMs' access pattern.
- ``reference``: cuBLAS for the same GEMMs dense ([P, H] x [H, 2I]: weights shared, compute-bound)
  and ``torch._grouped_mm`` over pre-sorted rows (every expert's weights streamed once).
The device's copy and matmul ceilings are measured several times (their spread is part of the result).

    python benchmarks/bench_prefill_limits.py --out results/bench_prefill_limits_h100.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from bench_kernels import SHAPES, Problem, device_ceilings, graph_us, kernel_us, median_us
from moerun.kernels.fused_moe import fused_moe
from moerun.kernels.fused_moe_config import get_config

TOKENS = 2048


@triton.jit
def _stream_rows_kernel(desc, out_ptr, rows_per_expert, tiles_per_expert, K, BN: tl.constexpr, BK: tl.constexpr):
    # one (expert, row tile) per program, every K step loaded by TMA and summed so nothing is elided
    pid = tl.program_id(0)
    row = (pid // tiles_per_expert) * rows_per_expert + (pid % tiles_per_expert) * BN
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        acc += desc.load([row, k0]).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def stream_us(weights: torch.Tensor, rows_per_expert: int, block_n: int, block_k: int, stages: int) -> float:
    """Time to read ``weights`` [E * rows_per_expert, K] in TMA tiles [block_n, block_k], no compute."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    desc = TensorDescriptor.from_tensor(weights, [block_n, block_k])
    tiles = triton.cdiv(rows_per_expert, block_n)
    grid = (weights.shape[0] // rows_per_expert * tiles,)
    out = torch.empty(grid[0], device=weights.device)
    return median_us(lambda: _stream_rows_kernel[grid](desc, out, rows_per_expert, tiles, weights.shape[1],
                                                       BN=block_n, BK=block_k, num_warps=8, num_stages=stages))


def ids_with_counts(counts: list[int], top_k: int) -> torch.Tensor:
    """[T, K] routing in which expert e takes counts[e] pairs, each token's K experts distinct
    (every count <= T: a run of one expert's pairs falls on distinct tokens)."""
    experts = torch.cat([torch.full((n,), e, dtype=torch.int32) for e, n in enumerate(counts) if n])
    pair = torch.arange(experts.numel())
    ids = torch.empty(TOKENS, top_k, dtype=torch.int32)
    ids[pair % TOKENS, pair // TOKENS] = experts
    return ids.cuda()


def whole_blocks(num_experts: int, top_k: int, block_m: int) -> list[int]:
    """Per-expert counts that are whole blocks and add up to T * K (as even as blocks allow)."""
    blocks = TOKENS * top_k // block_m
    return [block_m * (blocks // num_experts + (e < blocks % num_experts)) for e in range(num_experts)]


def bench_shape(name: str, shape: tuple) -> dict:
    hidden, inter, num_experts, top_k = shape
    prob = Problem(*shape)
    cfg = get_config(torch.device("cuda"), hidden, inter)
    x, ids, w = prob.inputs(TOKENS, 1234)
    out = torch.empty_like(x)
    pairs = TOKENS * top_k
    flops = 2 * pairs * 3 * inter * hidden
    row = {"shape": name, "H": hidden, "I": inter, "E": num_experts, "K": top_k, "flops": flops,
           "weight_bytes": num_experts * prob.expert_bytes(), "config": repr(cfg.prefill)}
    routings = {
        "random": ids,
        "whole_blocks": ids_with_counts(whole_blocks(num_experts, top_k, cfg.prefill.block_m), top_k),
        "K_experts_in_L2": ids_with_counts([TOKENS] * top_k + [0] * (num_experts - top_k), top_k),
    }
    for tag, route in routings.items():
        call = lambda route=route: fused_moe(x, route, w, prob.table, prob.arena, prob.layout, out, config=cfg)  # noqa: E731
        row[f"routing_{tag}_us"] = graph_us([call], replays=20)
        row[f"routing_{tag}_kernels_us"] = {k.split("(")[0][:40]: v for k, v in kernel_us(call).items()}

    gate_up = prob.gate_up.reshape(-1, hidden)  # [E * 2I, H]
    down = prob.down.reshape(-1, inter)  # [E * H, I]
    gu, dn = cfg.prefill.gate_up, cfg.prefill.down
    row["stream_gate_up_gemm_tile_us"] = stream_us(gate_up, 2 * inter, gu.block_n, gu.block_k, gu.num_stages)
    row["stream_down_gemm_tile_us"] = stream_us(down, hidden, dn.block_n, dn.block_k, dn.num_stages)
    row["stream_gate_up_64x256_us"] = stream_us(gate_up, 2 * inter, 64, 256, 3)
    row["stream_down_64x256_us"] = stream_us(down, hidden, 64, 256, 3)
    row["gate_up_weight_bytes"] = gate_up.numel() * gate_up.element_size()
    row["down_weight_bytes"] = down.numel() * down.element_size()

    a = torch.randn(pairs, hidden, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(pairs, inter, device="cuda", dtype=torch.bfloat16)
    row["cublas_dense_gate_up_us"] = median_us(lambda: a @ prob.gate_up[0].T)
    row["cublas_dense_down_us"] = median_us(lambda: h @ prob.down[0].T)
    counts = whole_blocks(num_experts, top_k, cfg.prefill.block_m)
    offs = torch.tensor(counts, device="cuda").cumsum(0).int()
    try:
        row["grouped_mm_gate_up_us"] = median_us(lambda: torch._grouped_mm(a, prob.gate_up.transpose(1, 2), offs=offs))
        row["grouped_mm_down_us"] = median_us(lambda: torch._grouped_mm(h, prob.down.transpose(1, 2), offs=offs))
    except Exception as exc:  # reported, not hidden: a torch without it
        row["grouped_mm"] = f"failed: {type(exc).__name__}: {exc}"[:200]
    del prob
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["deepseek-v2-lite", "olmoe", "qwen1.5-moe"])
    ap.add_argument("--ceiling-repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_prefill_limits.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill_limits needs a CUDA device")
    torch.manual_seed(0)
    ceilings = [device_ceilings() for _ in range(args.ceiling_repeats)]
    result = {"device": torch.cuda.get_device_name(), "tokens": TOKENS, "ceilings": ceilings, "rows": []}
    for name in args.shapes:
        row = bench_shape(name, SHAPES[name])
        ceilings.append(device_ceilings())  # after each shape too: the GPU's clocks drift as it warms
        result["rows"].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        copy = statistics.median(c["copy_GBps"] for c in ceilings)
        print(f"{name}: prefill random {row['routing_random_us']:.1f} us, whole blocks "
              f"{row['routing_whole_blocks_us']:.1f}, K experts in L2 {row['routing_K_experts_in_L2_us']:.1f}")
        for tag in ("random", "whole_blocks", "K_experts_in_L2"):
            print(f"  {tag:16s} " + ", ".join(f"{k} {v:.1f}" for k, v in row[f"routing_{tag}_kernels_us"].items()))
        for part in ("gate_up", "down"):
            nbytes = row[f"{part}_weight_bytes"]
            print(f"  {part} weights {nbytes / 1e6:.0f} MB: at the copy rate {nbytes / copy / 1e3:.1f} us; "
                  f"streamed in the GEMM's tile {row[f'stream_{part}_gemm_tile_us']:.1f} us "
                  f"({nbytes / row[f'stream_{part}_gemm_tile_us'] / 1e3:.0f} GB/s), in [64, 256] tiles "
                  f"{row[f'stream_{part}_64x256_us']:.1f} us ({nbytes / row[f'stream_{part}_64x256_us'] / 1e3:.0f} GB/s)")
        print(f"  cuBLAS dense gate_up {row['cublas_dense_gate_up_us']:.1f} us, down {row['cublas_dense_down_us']:.1f}; "
              f"torch._grouped_mm gate_up {row.get('grouped_mm_gate_up_us', float('nan')):.1f}, "
              f"down {row.get('grouped_mm_down_us', float('nan')):.1f}")
    mm = [c["matmul_TFLOPs"] for c in ceilings]
    print(f"ceilings: matmul {min(mm):.0f}-{max(mm):.0f} TFLOP/s over {len(mm)} measurements, copy "
          f"{min(c['copy_GBps'] for c in ceilings):.0f}-{max(c['copy_GBps'] for c in ceilings):.0f} GB/s")


if __name__ == "__main__":
    main()
