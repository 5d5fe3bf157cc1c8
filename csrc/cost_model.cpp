// Miss schedule and cost model of the policy engine. gpu_only copies every miss, cpu_fallback runs
// every miss on the CPU, hybrid splits a step's misses between the copy engine and the CPU so the
// layer finishes earliest, crediting a decode copy with the reuse it buys (a fetched expert stays
// cached; a prefill's staged copy does not). A CPU expert costs a fixed time (its weights read) plus a
// time per token, both learned from the CPU jobs' timings (fit_cpu_rates).
// The model's bandwidth and CPU rate are re-estimated from the timings the runtime observes, and
// the engine keeps a simulated clock so replay can estimate time and stats report prediction error.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "policy_engine.h"

namespace moerun {
namespace policy {

void Engine::schedule_misses(int layer, bool prefill, int room) {
  const size_t m = miss_.size();
  miss_gpu_.assign(m, cfg_.schedule == Schedule::CpuFallback ? 0 : 1);
  // Most tokens first: they gain most from the GPU.
  std::vector<int32_t>& order = prefill ? miss_order_ : uniq_count_;  // decode: scratch (counts consumed)
  order.resize(m);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return miss_tokens_[a] > miss_tokens_[b]; });
  if (cfg_.schedule != Schedule::Hybrid || m == 0) return;
  const double copy = copy_us();
  if (prefill) {
    // Copies (behind the copies already streamed for this layer) and CPU experts side by side, each
    // miss where it finishes sooner, at most `room` copies (the slots the prefill may use). No reuse
    // credit: a staged copy leaves after this step.
    double gpu_t = std::max(now_us_, copy_free_us_), cpu_t = now_us_;
    int copies = 0;
    for (int i : order) {
      const double cpu = cpu_cost_us(1, miss_tokens_[i]);
      const bool gpu = copies < room && gpu_t + copy <= cpu_t + cpu;
      miss_gpu_[i] = gpu ? 1 : 0;
      if (gpu) { gpu_t += copy; ++copies; } else { cpu_t += cpu; }
    }
    return;
  }
  // Demand copies jump queued prefetches with priority routing; otherwise they wait behind them.
  double gpu_t = cfg_.priority_routing ? now_us_ : std::max(now_us_, copy_free_us_);
  double cpu_t = now_us_;
  const int64_t acc = layer_accesses_[layer];
  const double reuse = acc > 0 ? double(layer_hits_[layer]) / double(acc) : 0.0;
  for (int i : order) {
    const double cpu_us = cpu_cost_us(1, miss_tokens_[i]);
    bool gpu;
    if (cfg_.offload_threshold_ms > 0) {
      gpu = (gpu_t - now_us_ + copy) <= cfg_.offload_threshold_ms * 1e3;
    } else {
      // A copy also saves the expected cost of this expert's next miss (it stays cached).
      const double credit = reuse * std::min(copy, cpu_us);
      gpu = gpu_t + copy - credit <= cpu_t + cpu_us;
    }
    miss_gpu_[i] = gpu ? 1 : 0;
    if (gpu) gpu_t += copy; else cpu_t += cpu_us;
  }
}

void Engine::advance_time(int layer, int64_t cpu_experts, int64_t cpu_tokens) {
  Plan& out = *out_;
  const double copy = copy_us();
  const int demand = int(out.fetches.size() / 4), prefetch = int(out.prefetches.size() / 5);
  const double start = now_us_;
  // A prefill's copies queue behind the ones streamed ahead for this layer.
  const double copy_start = cfg_.priority_routing && !in_prefill_ ? start : std::max(start, copy_free_us_);
  const double demand_done = demand > 0 ? copy_start + demand * copy : start;
  const double cpu_done = start + cpu_cost_us(double(cpu_experts), double(cpu_tokens));
  const double end = std::max(demand_done, cpu_done) + cost_.gpu_layer_us;
  copy_free_us_ = std::max(copy_free_us_, demand_done) + prefetch * copy;
  now_us_ = end;
  out.predicted_us = end - start;
  layer_predicted_us_[layer] = out.predicted_us;
}

void Engine::observe_timing(int layer, double layer_us, double copy_us, int64_t copy_bytes,
                            double cpu_us, int64_t cpu_expert_tokens, int64_t cpu_experts) {
  const double a = cost_.ema;
  if (copy_us > 0 && copy_bytes > 0)
    cost_.h2d_bytes_per_us = (1 - a) * cost_.h2d_bytes_per_us + a * double(copy_bytes) / copy_us;
  if (cpu_us > 0 && cpu_expert_tokens > 0) {
    // One CPU job: per expert, tau tokens took y µs. The sums decay by the EMA weight per job.
    const double experts = cpu_experts > 0 ? double(cpu_experts) : double(cpu_expert_tokens);
    const double tau = double(cpu_expert_tokens) / experts, y = cpu_us / experts;
    cpu_w_ = (1 - a) * cpu_w_ + a;
    cpu_wt_ = (1 - a) * cpu_wt_ + a * tau;
    cpu_wy_ = (1 - a) * cpu_wy_ + a * y;
    cpu_wtt_ = (1 - a) * cpu_wtt_ + a * tau * tau;
    cpu_wty_ = (1 - a) * cpu_wty_ + a * tau * y;
    fit_cpu_rates();
  }
  if (layer_us > 0 && layer >= 0 && layer < L_) {
    const double predicted = layer_predicted_us_[layer];
    if (predicted > 0) { pred_err_sum_ += std::fabs(predicted - layer_us) / layer_us; ++pred_err_n_; }
    total_.observed_us += layer_us;
    ++total_.observed_steps;
  }
}

// The CPU's two rates from the weighted jobs: a least-squares line y = per_expert + per_token * tau
// when the jobs' token counts per expert differ enough to tell the two apart (a prefill's jobs beside a
// decode's), else both rates scaled so the line meets the jobs' mean (decode alone: one token per
// expert says what one expert-token costs, not how it splits).
void Engine::fit_cpu_rates() {
  const double t = cpu_wt_ / cpu_w_, y = cpu_wy_ / cpu_w_;
  const double var = cpu_wtt_ / cpu_w_ - t * t, cov = cpu_wty_ / cpu_w_ - t * y;
  if (var > 0.25 + 0.01 * t * t) {
    const double slope = cov / var, intercept = y - slope * t;
    if (slope > 0 && intercept >= 0) {
      cost_.cpu_us_per_expert_token = slope;
      cost_.cpu_us_per_expert = intercept;
      return;
    }
  }
  const double predicted = cost_.cpu_us_per_expert + cost_.cpu_us_per_expert_token * t;
  if (predicted > 0 && y > 0) {
    cost_.cpu_us_per_expert *= y / predicted;
    cost_.cpu_us_per_expert_token *= y / predicted;
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
