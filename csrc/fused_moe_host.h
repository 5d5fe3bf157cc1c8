// Fused MoE over an arena of expert slots in host memory: the CPU twin of kernels/fused_moe.py, for a model
// whose "device" is the CPU (no GPU: the arena is host memory and the Triton kernels could only be
// interpreted). y[t] = sum_k w[t,k] * (down(act(gate(x[t]), up(x[t]))) over the pairs whose expert has a
// slot in `slot_table`, act the expert activation (expert_activation.h) and each projection plus its bias
// where the layout holds biases; pairs not resident contribute zero (the CPU executor adds those it is given).
// Slots in any expert format (the layout says which); the same fp32 accumulation and matmul_rows kernels as
// the CPU executor, which read quantized weights packed and dequantize them in registers.
// A function of its arguments: it holds no state and runs on the caller's thread and the ParallelFor it is given.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "expert_activation.h"
#include "parallel_for.h"
#include "slot_layout.h"

namespace moerun {

// x: [T, H] of layout.dtype; topk_ids [T, K] int64; topk_weights [T, K] fp32; slot_table [E] int32 (-1: not
// resident); arena: num_slots slots of layout.slot_bytes each, in `layout`; out: [T, H] of layout.dtype,
// every element written.
struct FusedMoeHostArgs {
  const void* x;
  SlotLayout layout;
  int64_t T, K, E, num_slots;
  const int64_t* topk_ids;
  const float* topk_weights;
  const int32_t* slot_table;
  const void* arena;
  void* out;
  ExpertActivation activation;
};

void fused_moe_host(const FusedMoeHostArgs& a, const ParallelFor& parallel_for);

}  // namespace moerun
