#include "cpu_executor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moerun {
namespace {
constexpr int64_t kGateRowsPerTask = 32;  // rows of gate (and as many of up) per phase-1 task
constexpr int64_t kDownRowsPerTask = 32;  // output columns per phase-2 task (H / 32 tasks keep 15+ threads busy)
// Tokens per kernel call: one call streams its weight rows once for all of them (AMX tiles take 16).
constexpr int64_t kTokenTile = 16;
}  // namespace

// The default counts the caller (it works on the job inside wait()) and leaves one physical core to the
// CUDA driver's own threads and the copy callbacks: a starved one stalls the whole step.
static int default_threads(int requested) {
  return requested > 0 ? requested : std::max(1, physical_core_count() - 1);
}

CpuExecutor::CpuExecutor(int num_threads) : isa_(detect_cpu_isa()), pool_(default_threads(num_threads)) {}

CpuExecutor::~CpuExecutor() {
  try {
    wait();
  } catch (...) {  // a task's error has nobody left to report to
  }
}

void CpuExecutor::submit(HostPool& pool, int64_t layer, const void* x, DType x_dtype, int64_t T,
                         const int64_t* topk_ids, const float* topk_weights, int64_t K,
                         const std::vector<int64_t>& experts, float* out, std::shared_ptr<void> keep_alive,
                         const ExpertActivation& activation) {
  if (busy() || next_job_ < jobs_.size())
    throw std::runtime_error("CpuExecutor.submit: the previous job is still running; call wait() first");
  release_held();  // a finished job nobody waited for
  if (layer < 0 || layer >= pool.num_layers())
    throw std::out_of_range("CpuExecutor: layer " + std::to_string(layer) + " is outside [0, " +
                            std::to_string(pool.num_layers()) + ")");
  const SlotLayout layout = pool.layout();  // the pool's expert format and shape
  const int64_t H = layout.hidden_size, I = layout.inter_size;
  // Gather each expert's tokens into contiguous fp32 rows (the caller's x may be freed after return).
  jobs_.clear();
  row_token_.clear();
  row_weight_.clear();
  for (int64_t e : experts) {
    if (e < 0 || e >= pool.num_experts())
      throw std::out_of_range("CpuExecutor: expert " + std::to_string(e) + " is outside [0, " +
                              std::to_string(pool.num_experts()) + ")");
    const int64_t first = static_cast<int64_t>(row_token_.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k)
        if (topk_ids[t * K + k] == e) {
          row_token_.push_back(t);
          row_weight_.push_back(topk_weights[t * K + k]);
        }
    const int64_t n = static_cast<int64_t>(row_token_.size()) - first;
    if (n > 0) jobs_.push_back({e, nullptr, first, n});
  }
  const int64_t rows = static_cast<int64_t>(row_token_.size());
  xg_.resize(static_cast<size_t>(rows * H));
  h_.resize(static_cast<size_t>(rows * I));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = row_token_[r];
    for (int64_t c = 0; c < H; ++c) xg_[r * H + c] = load_as_f32(x, t * H + c, x_dtype);
  }
  std::memset(out, 0, static_cast<size_t>(T * H) * sizeof(float));
  out_ = out;
  keep_alive_ = std::move(keep_alive);
  host_ = &pool;
  layout_ = layout;
  activation_ = activation;
  layer_ = layer;
  next_job_ = 0;
  job_us_ = 0.0;
  round_size_ = static_cast<size_t>(pool.capacity());
  if (!jobs_.empty()) start_round();
}

void CpuExecutor::start_round() {
  const size_t j0 = next_job_, j1 = std::min(jobs_.size(), j0 + round_size_);
  next_job_ = j1;
  try {
    for (size_t j = j0; j < j1; ++j) {
      jobs_[j].weights = host_->acquire(layer_, jobs_[j].expert);
      held_.push_back(jobs_[j].expert);
    }
  } catch (...) {
    next_job_ = jobs_.size();
    release_held();
    throw;
  }
  const SlotLayout layout = layout_;
  const int64_t H = layout.hidden_size, I = layout.inter_size;
  const int64_t gate_blocks = (I + kGateRowsPerTask - 1) / kGateRowsPerTask;
  const int64_t down_blocks = (H + kDownRowsPerTask - 1) / kDownRowsPerTask;
  const CpuIsa isa = isa_;
  const ExpertActivation act = activation_;
  float* out = out_;
  // Activations in the forms the kernels read, made once per token tile here and in phase 1, not once per
  // kernel call: bf16 weights on AVX-512-BF16 / AMX read bf16 activations (and AMX VNNI tiles), 4-bit
  // formats the fp32 rows in nibble order.
  const bool round = !layout.format.quantized() && layout.dtype == DType::BF16 &&
                     (isa == CpuIsa::Avx512Bf16 || isa == CpuIsa::AmxBf16);
  const bool vnni = round && isa == CpuIsa::AmxBf16 && H % 32 == 0 && I % 32 == 0;  // AMX tiles fit
  const bool nib = nibble_format(layout.format);
  static_assert(kGateRowsPerTask % 32 == 0, "phase 1's h columns must cover whole runs of 32 (nibble order)");
  const int64_t rows = static_cast<int64_t>(row_token_.size());
  xb_.resize(round ? static_cast<size_t>(rows * H) : 0);
  hb_.resize(round ? static_cast<size_t>(rows * I) : 0);
  xv_.resize(vnni ? static_cast<size_t>(rows * H) : 0);
  hv_.resize(vnni ? static_cast<size_t>(rows * I) : 0);
  xn_.resize(nib ? static_cast<size_t>(rows * H) : 0);
  hn_.resize(nib ? static_cast<size_t>(rows * I) : 0);
  tiles_.clear();  // (job, first token) of every token tile of this round
  for (size_t j = j0; j < j1; ++j)
    for (int64_t t0 = 0; t0 < jobs_[j].num_tokens; t0 += kTokenTile) tiles_.push_back({j, t0});
  auto acts = [=](const std::vector<float>& f, const std::vector<uint16_t>& b, const std::vector<uint16_t>& v,
                  const std::vector<float>& n, int64_t row, int64_t ld) {
    return Acts{f.data() + row * ld, ld, round ? b.data() + row * ld : nullptr, vnni ? v.data() + row * ld : nullptr,
                nib ? n.data() + row * ld : nullptr};
  };
  std::vector<ThreadPool::Phase> phases;
  if (round || nib)  // Phase 0: this round's token rows in the kernels' forms, one tile per task.
    phases.push_back({static_cast<int64_t>(tiles_.size()), [=](int64_t task) {
                        const Job& j = jobs_[tiles_[static_cast<size_t>(task)].first];
                        const int64_t t0 = tiles_[static_cast<size_t>(task)].second;
                        const int64_t tn = std::min<int64_t>(kTokenTile, j.num_tokens - t0);
                        const int64_t base = (j.first_row + t0) * H;
                        for (int64_t t = 0; t < tn; ++t) {
                          if (nib) to_nibble_order(xg_.data() + base + t * H, xn_.data() + base + t * H, H);
                          for (int64_t c = 0; round && c < H; ++c) {
                            const uint16_t v = f32_to_bf16(xg_[base + t * H + c]);
                            xb_[base + t * H + c] = v;
                            if (vnni) xv_[base + vnni_index(c, t, tn)] = v;
                          }
                        }
                      }});
  // Phase 1: h = act(x @ gate.T + gate bias, x @ up.T + up bias), by blocks of I rows of each expert.
  phases.push_back({static_cast<int64_t>(j1 - j0) * gate_blocks, [=](int64_t task) {
                      const Job& j = jobs_[j0 + static_cast<size_t>(task / gate_blocks)];
                      const int64_t i0 = (task % gate_blocks) * kGateRowsPerTask;
                      const int64_t i1 = std::min(I, i0 + kGateRowsPerTask);
                      const int64_t n = i1 - i0;
                      float g[kTokenTile * kGateRowsPerTask], u[kTokenTile * kGateRowsPerTask];  // [tile, n]
                      const SlotMatrix w = slot_gate_up(layout, j.weights);
                      const SlotBias bias = slot_gate_up_bias(layout, j.weights);
                      for (int64_t t0 = 0; t0 < j.num_tokens; t0 += kTokenTile) {
                        const int64_t tn = std::min<int64_t>(kTokenTile, j.num_tokens - t0);
                        const Acts xr = acts(xg_, xb_, xv_, xn_, j.first_row + t0, H);
                        matmul_rows(isa, w, i0, i1, xr, tn, g, n);
                        matmul_rows(isa, w, I + i0, I + i1, xr, tn, u, n);
                        const int64_t base = (j.first_row + t0) * I;
                        for (int64_t t = 0; t < tn; ++t)
                          for (int64_t i = 0; i < n; ++i) {
                            const float hv = act(g[t * n + i] + bias[i0 + i], u[t * n + i] + bias[I + i0 + i]);
                            h_[base + t * I + i0 + i] = hv;
                            if (round) hb_[base + t * I + i0 + i] = f32_to_bf16(hv);
                            if (vnni) hv_[base + vnni_index(i0 + i, t, tn)] = f32_to_bf16(hv);
                            if (nib) hn_[base + t * I + nibble_index(i0 + i)] = hv;
                          }
                      }
                    }});
  // Phase 2: out[t, c0:c1] += w * (h @ down.T + down bias)[c0:c1] for every expert; one task owns its columns.
  phases.push_back({down_blocks, [=](int64_t task) {
                      const int64_t c0 = task * kDownRowsPerTask;
                      const int64_t c1 = std::min(H, c0 + kDownRowsPerTask);
                      const int64_t n = c1 - c0;
                      float y[kTokenTile * kDownRowsPerTask];
                      for (size_t jj = j0; jj < j1; ++jj) {
                        const Job& j = jobs_[jj];
                        const SlotMatrix down = slot_down(layout, j.weights);
                        const SlotBias bias = slot_down_bias(layout, j.weights);
                        for (int64_t t0 = 0; t0 < j.num_tokens; t0 += kTokenTile) {
                          const int64_t tn = std::min<int64_t>(kTokenTile, j.num_tokens - t0);
                          matmul_rows(isa, down, c0, c1, acts(h_, hb_, hv_, hn_, j.first_row + t0, I), tn, y, n);
                          for (int64_t t = 0; t < tn; ++t) {
                            const int64_t row = j.first_row + t0 + t;
                            float* o = out + row_token_[row] * H + c0;
                            const float gw = row_weight_[row];
                            for (int64_t i = 0; i < n; ++i) o[i] += gw * (y[t * n + i] + bias[c0 + i]);
                          }
                        }
                      }
                    }});
  pool_.submit(std::move(phases));
}

void CpuExecutor::release_held() {
  for (int64_t e : held_) host_->release(layer_, e);
  held_.clear();
}

void CpuExecutor::wait() {
  std::shared_ptr<void> held = std::move(keep_alive_);  // released however the job ended
  for (;;) {
    try {
      pool_.wait();
    } catch (...) {
      next_job_ = jobs_.size();  // a failed round ends the job
      release_held();
      throw;
    }
    if (!held_.empty()) job_us_ += pool_.last_job_us();  // a round ran (not a second wait after the end)
    release_held();
    if (next_job_ >= jobs_.size()) return;
    start_round();  // a cache smaller than the job: the next experts, now that the last ones are free
  }
}

}  // namespace moerun
