// Miss schedule and cost model of the policy engine. gpu_only copies every miss, cpu_fallback runs
// every miss on the CPU, hybrid splits a step's misses between the copy engine and the CPU so the
// layer finishes earliest, crediting a copy with the reuse it buys (a fetched expert stays cached).
// The model's bandwidth and CPU rate are re-estimated from the timings the runtime observes, and
// the engine keeps a simulated clock so replay can estimate time and stats report prediction error.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "policy_engine.h"

namespace moerun {
namespace policy {

void Engine::schedule_misses(int layer) {
  const size_t m = miss_.size();
  miss_gpu_.assign(m, cfg_.schedule == Schedule::CpuFallback ? 0 : 1);
  if (cfg_.schedule != Schedule::Hybrid || m == 0) return;
  const double copy_us = cost_.copy_latency_us + double(cfg_.expert_bytes) / cost_.h2d_bytes_per_us;
  // Demand copies jump queued prefetches with priority routing; otherwise they wait behind them.
  double gpu_t = cfg_.priority_routing ? now_us_ : std::max(now_us_, copy_free_us_);
  double cpu_t = now_us_;
  const int64_t acc = layer_accesses_[layer];
  const double reuse = acc > 0 ? double(layer_hits_[layer]) / double(acc) : 0.0;
  // Most tokens first: they gain most from the GPU.
  std::vector<int32_t>& order = uniq_count_;  // scratch: per-unique counts are consumed already
  order.resize(m);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return miss_tokens_[a] > miss_tokens_[b]; });
  for (int i : order) {
    const double cpu_us = cost_.cpu_us_per_expert_token * miss_tokens_[i];
    bool gpu;
    if (cfg_.offload_threshold_ms > 0) {
      gpu = (gpu_t - now_us_ + copy_us) <= cfg_.offload_threshold_ms * 1e3;
    } else {
      // A copy also saves the expected cost of this expert's next miss (it stays cached).
      const double credit = reuse * std::min(copy_us, cpu_us);
      gpu = gpu_t + copy_us - credit <= cpu_t + cpu_us;
    }
    miss_gpu_[i] = gpu ? 1 : 0;
    if (gpu) gpu_t += copy_us; else cpu_t += cpu_us;
  }
}

void Engine::advance_time(int layer, int64_t cpu_tokens) {
  Plan& out = *out_;
  const double copy_us = cost_.copy_latency_us + double(cfg_.expert_bytes) / cost_.h2d_bytes_per_us;
  const int demand = int(out.fetches.size() / 4), prefetch = int(out.prefetches.size() / 5);
  const double start = now_us_;
  const double copy_start = cfg_.priority_routing ? start : std::max(start, copy_free_us_);
  const double demand_done = demand > 0 ? copy_start + demand * copy_us : start;
  const double cpu_done = start + cost_.cpu_us_per_expert_token * double(cpu_tokens);
  const double end = std::max(demand_done, cpu_done) + cost_.gpu_layer_us;
  copy_free_us_ = std::max(copy_free_us_, demand_done) + prefetch * copy_us;
  now_us_ = end;
  out.predicted_us = end - start;
  layer_predicted_us_[layer] = out.predicted_us;
}

void Engine::observe_timing(int layer, double layer_us, double copy_us, int64_t copy_bytes,
                            double cpu_us, int64_t cpu_expert_tokens) {
  const double a = cost_.ema;
  if (copy_us > 0 && copy_bytes > 0)
    cost_.h2d_bytes_per_us = (1 - a) * cost_.h2d_bytes_per_us + a * double(copy_bytes) / copy_us;
  if (cpu_us > 0 && cpu_expert_tokens > 0)
    cost_.cpu_us_per_expert_token =
        (1 - a) * cost_.cpu_us_per_expert_token + a * cpu_us / double(cpu_expert_tokens);
  if (layer_us > 0 && layer >= 0 && layer < L_) {
    const double predicted = layer_predicted_us_[layer];
    if (predicted > 0) { pred_err_sum_ += std::fabs(predicted - layer_us) / layer_us; ++pred_err_n_; }
    total_.observed_us += layer_us;
    ++total_.observed_steps;
  }
}

double Engine::prediction_error() const {
  return pred_err_n_ > 0 ? pred_err_sum_ / double(pred_err_n_) : NAN;
}

double Engine::prediction_accuracy() const {
  return predictions_ > 0 ? double(predictions_right_) / double(predictions_) : NAN;
}

}  // namespace policy
}  // namespace moerun
