// Fused MoE over an arena of expert slots in host memory: the CPU twin of kernels/fused_moe.py, for a model
// whose "device" is the CPU (no GPU: the arena is host memory and the Triton kernels could only be
// interpreted). y[t] = sum_k w[t,k] * down(silu(gate(x[t])) * up(x[t])) over the pairs whose expert has a
// slot in `slot_table`; pairs not resident contribute zero (the CPU executor adds those it is given).
// Same slot layout (slot_layout.h), same fp32 accumulation, same matmul_rows kernels as the CPU executor.
// A function of its arguments: it holds no state and runs on the caller's thread and torch's intra-op pool.
#pragma once
#include <cstdint>
#include <functional>

#include "dtype.h"

namespace moerun {

// x: [T, H] of dtype; topk_ids [T, K] int64; topk_weights [T, K] fp32; slot_table [E] int32 (-1: not
// resident); arena: num_slots slots of `dtype` in the slot layout of (H, I); out: [T, H] of dtype, every
// element written.
struct FusedMoeHostArgs {
  const void* x;
  DType dtype;
  int64_t T, H, I, K, E, num_slots;
  const int64_t* topk_ids;
  const float* topk_weights;
  const int32_t* slot_table;
  const void* arena;
  void* out;
};

// Runs task(i) for every i in [0, n), on as many threads as the caller provides (the binding: torch's
// intra-op pool), returning when all are done; tasks of one call never write the same memory.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& task)>;

void fused_moe_host(const FusedMoeHostArgs& a, const ParallelFor& parallel_for);

}  // namespace moerun
