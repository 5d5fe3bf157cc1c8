#include "fused_moe_host.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "expert_codec.h"
#include "slot_layout.h"

namespace moerun {
namespace {
constexpr int64_t kGateRows = 32;  // gate (and as many up) rows per phase-1 task
constexpr int64_t kDownRows = 32;  // output columns per phase-2 task
constexpr int64_t kTokenTile = 16;  // tokens per matmul_rows call: weight rows stream once for all of them
}  // namespace

void fused_moe_host(const FusedMoeHostArgs& a, const ParallelFor& parallel_for) {
  const SlotLayout& layout = a.layout;
  const int64_t T = a.T, H = layout.hidden_size, I = layout.inter_size, K = a.K;
  const DType dtype = layout.dtype;
  const ExpertActivation act = a.activation;
  static const CpuIsa isa = detect_cpu_isa();
  // Pairs grouped by resident expert: rows of (token, gate weight), each expert's rows contiguous.
  struct Group {
    const char* weights;
    int64_t first_row, num_rows;
  };
  std::vector<Group> groups;
  std::vector<int64_t> row_token;
  std::vector<float> row_weight;
  std::vector<std::vector<int64_t>> pairs_of(static_cast<size_t>(a.E));
  for (int64_t p = 0; p < T * K; ++p) {
    const int64_t e = a.topk_ids[p];
    if (e < 0 || e >= a.E)
      throw std::out_of_range("fused_moe_host: expert id " + std::to_string(e) + " is outside [0, " +
                              std::to_string(a.E) + ")");
    if (a.slot_table[e] >= 0) pairs_of[static_cast<size_t>(e)].push_back(p);
  }
  for (int64_t e = 0; e < a.E; ++e) {
    const auto& pairs = pairs_of[static_cast<size_t>(e)];
    if (pairs.empty()) continue;
    const int64_t slot = a.slot_table[e];
    if (slot >= a.num_slots)
      throw std::out_of_range("fused_moe_host: slot " + std::to_string(slot) + " of expert " + std::to_string(e) +
                              " is outside the arena's " + std::to_string(a.num_slots) + " slots");
    groups.push_back({static_cast<const char*>(a.arena) + slot * layout.slot_bytes,
                      static_cast<int64_t>(row_token.size()), static_cast<int64_t>(pairs.size())});
    for (int64_t p : pairs) {
      row_token.push_back(p / K);
      row_weight.push_back(a.topk_weights[p]);
    }
  }
  const int64_t rows = static_cast<int64_t>(row_token.size());
  std::vector<float> xg(static_cast<size_t>(rows * H));  // [rows, H] each row's token, fp32
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < H; ++c) xg[r * H + c] = load_as_f32(a.x, row_token[r] * H + c, dtype);
  // 4-bit formats read activations in nibble order (cpu_kernels.h): x's rows once here, h's as phase 1 makes them.
  const bool nib = nibble_format(layout.format);
  std::vector<float> xn(nib ? static_cast<size_t>(rows * H) : 0), hn(nib ? static_cast<size_t>(rows * I) : 0);
  for (int64_t r = 0; nib && r < rows; ++r) to_nibble_order(xg.data() + r * H, xn.data() + r * H, H);
  std::vector<float> h(static_cast<size_t>(rows * I));  // [rows, I] act(gate, up)
  std::vector<float> y(static_cast<size_t>(T * H), 0.f);  // [T, H] fp32 sum
  const int64_t gate_blocks = (I + kGateRows - 1) / kGateRows;
  const int64_t down_blocks = (H + kDownRows - 1) / kDownRows;
  // Phase 1: h = act(x @ gate.T + gate bias, x @ up.T + up bias), by blocks of I rows of each expert. A block of
  // kGateRows = 32 columns of h is one run of the nibble order, so a task writes its hn columns whole.
  static_assert(kGateRows % 32 == 0, "phase 1's h columns must cover whole runs of 32 (nibble order)");
  run_tasks(parallel_for, static_cast<int64_t>(groups.size()) * gate_blocks, [&](int64_t task) {
    const Group& g = groups[static_cast<size_t>(task / gate_blocks)];
    const int64_t i0 = (task % gate_blocks) * kGateRows, i1 = std::min(I, i0 + kGateRows), n = i1 - i0;
    float gv[kTokenTile * kGateRows], uv[kTokenTile * kGateRows];
    const SlotMatrix w = slot_gate_up(layout, g.weights);
    const SlotBias bias = slot_gate_up_bias(layout, g.weights);
    for (int64_t t0 = 0; t0 < g.num_rows; t0 += kTokenTile) {
      const int64_t tn = std::min(kTokenTile, g.num_rows - t0);
      const int64_t row0 = g.first_row + t0;
      const Acts xr{xg.data() + row0 * H, H, nullptr, nullptr, nib ? xn.data() + row0 * H : nullptr};
      matmul_rows(isa, w, i0, i1, xr, tn, gv, n);
      matmul_rows(isa, w, I + i0, I + i1, xr, tn, uv, n);
      for (int64_t t = 0; t < tn; ++t)
        for (int64_t i = 0; i < n; ++i) {
          const float hv = act(gv[t * n + i] + bias[i0 + i], uv[t * n + i] + bias[I + i0 + i]);
          h[(row0 + t) * I + i0 + i] = hv;
          if (nib) hn[(row0 + t) * I + nibble_index(i0 + i)] = hv;
        }
    }
  });
  // Phase 2: y[t, c0:c1] += w * (h @ down.T + down bias)[c0:c1] over every group; a task owns its columns.
  run_tasks(parallel_for, down_blocks, [&](int64_t task) {
    const int64_t c0 = task * kDownRows, c1 = std::min(H, c0 + kDownRows), n = c1 - c0;
    float part[kTokenTile * kDownRows];
    for (const Group& g : groups) {
      const SlotMatrix down = slot_down(layout, g.weights);
      const SlotBias bias = slot_down_bias(layout, g.weights);
      for (int64_t t0 = 0; t0 < g.num_rows; t0 += kTokenTile) {
        const int64_t tn = std::min(kTokenTile, g.num_rows - t0);
        const int64_t row0 = g.first_row + t0;
        const Acts hr{h.data() + row0 * I, I, nullptr, nullptr, nib ? hn.data() + row0 * I : nullptr};
        matmul_rows(isa, down, c0, c1, hr, tn, part, n);
        for (int64_t t = 0; t < tn; ++t) {
          const int64_t row = g.first_row + t0 + t;
          float* o = y.data() + row_token[row] * H + c0;
          for (int64_t i = 0; i < n; ++i) o[i] += row_weight[row] * (part[t * n + i] + bias[c0 + i]);
        }
      }
    }
  });
  for (int64_t i = 0; i < T * H; ++i) store_from_f32(a.out, i, dtype, y[i]);
}

}  // namespace moerun
