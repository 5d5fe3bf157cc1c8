// Offline replay: a whole recorded (or synthetic) trace through one policy engine, in C++, so a
// sweep does not pay a Python call per step. Steps run token-group by token-group, layer by layer,
// exactly as the runtime calls the engine. For Belady the next use of every access is precomputed
// from the trace; with oracle predictions, lookahead/learned prefetch is fed the true routing of the
// next layers (the best a predictor could do); given a predictor's output, it is fed that instead.
// As live: learned predictions for later layers come before a layer's step, lookahead's for the
// next layer after it (Engine::prefetch_ahead; live, from the hidden state the step produced).
// Steps the trace marks as prefill run as the runtime's prefill steps (staging, streaming ahead).
#include <climits>
#include <stdexcept>
#include <vector>

#include "policy_engine.h"

namespace moerun {
namespace policy {

ReplayResult replay_trace(Engine& engine, const int32_t* ids, const float* weights, int64_t tokens,
                          const int64_t* step_starts, int64_t steps, bool oracle_predictions,
                          const ReplayPredictions& predictions, Engine* host_tier, const uint8_t* prefill) {
  const EngineConfig& cfg = engine.config();
  const int L = cfg.num_layers, E = cfg.num_experts, K = cfg.top_k;
  if (steps < 0 || step_starts[0] != 0 || step_starts[steps] != tokens)
    throw std::invalid_argument("step_starts must run from 0 to the token count");
  const size_t row = size_t(L) * K;  // one token's ids over all layers
  std::vector<int32_t> next_use;
  if (cfg.eviction == Eviction::Belady) {
    if (int64_t(steps) * L >= INT32_MAX) throw std::invalid_argument("trace too long for belady");
    next_use.assign(size_t(tokens) * row, INT32_MAX);
    std::vector<int32_t> seen(size_t(L) * E, INT32_MAX);
    for (int64_t s = steps - 1; s >= 0; --s)
      for (int l = L - 1; l >= 0; --l) {
        const int32_t g = int32_t(s * L + l);
        for (int pass = 0; pass < 2; ++pass)
          for (int64_t t = step_starts[s]; t < step_starts[s + 1]; ++t)
            for (int k = 0; k < K; ++k) {
              const size_t i = size_t(t) * row + size_t(l) * K + k;
              const int32_t key = l * E + ids[i];
              if (pass == 0) next_use[i] = seen[key]; else seen[key] = g;
            }
      }
  }
  const bool predicting = cfg.prefetch == Prefetch::Lookahead || cfg.prefetch == Prefetch::Learned;
  const bool ahead = cfg.prefetch == Prefetch::Lookahead;  // predictions after the step, one layer ahead
  const bool given = predicting && predictions.ids != nullptr;
  const bool predict = predicting && oracle_predictions && !given;
  std::vector<int32_t> step_ids, step_next;
  std::vector<float> step_w;
  Plan plan, ahead_plan, host_plan;
  auto host_access = [&](int layer, int32_t expert) {
    host_tier->step(layer, &expert, nullptr, 1, host_plan);
  };
  auto gather = [&](int64_t s, int l) {
    step_ids.clear(); step_w.clear(); step_next.clear();
    for (int64_t t = step_starts[s]; t < step_starts[s + 1]; ++t) {
      const size_t i = size_t(t) * row + size_t(l) * K;
      step_ids.insert(step_ids.end(), ids + i, ids + i + K);
      if (weights != nullptr) step_w.insert(step_w.end(), weights + i, weights + i + K);
      if (!next_use.empty()) step_next.insert(step_next.end(), &next_use[i], &next_use[i] + K);
    }
  };
  for (int64_t s = 0; s < steps; ++s) {
    if (step_starts[s + 1] < step_starts[s]) throw std::invalid_argument("step_starts must not decrease");
    for (int l = 0; l < L; ++l) {
      if (given && !ahead)
        for (int d = 1; d <= engine.config().lookahead && d <= predictions.depth && l + d < L; ++d) {
          const size_t at = ((size_t(s) * L + l) * predictions.depth + (d - 1)) * predictions.width;
          engine.observe_prediction(l + d, predictions.ids + at,
                                    predictions.scores != nullptr ? predictions.scores + at : nullptr,
                                    predictions.width);
        }
      if (predict && !ahead)
        for (int d = 1; d <= engine.config().lookahead && l + d < L; ++d) {
          gather(s, l + d);
          engine.observe_prediction(l + d, step_ids.data(), weights != nullptr ? step_w.data() : nullptr,
                                    int(step_ids.size()));
        }
      gather(s, l);
      engine.step(l, step_ids.data(), weights != nullptr ? step_w.data() : nullptr,
                  int(step_ids.size()), plan, next_use.empty() ? nullptr : step_next.data(),
                  prefill != nullptr && prefill[s] != 0);
      if (host_tier != nullptr) {  // what the runtime reads from the host pool for this step
        for (size_t i = 0; i < plan.fetches.size(); i += 4) host_access(l, plan.fetches[i]);
        for (int32_t e : plan.cpu) host_access(l, e);
        for (size_t i = 0; i < plan.prefetches.size(); i += 5) host_access(plan.prefetches[i], plan.prefetches[i + 1]);
      }
      if (ahead && l + 1 < L && (given || predict)) {
        if (given) {
          const size_t at = (size_t(s) * L + l) * predictions.depth * predictions.width;
          engine.prefetch_ahead(l + 1, predictions.ids + at,
                                predictions.scores != nullptr ? predictions.scores + at : nullptr,
                                predictions.width, ahead_plan);
        } else {
          gather(s, l + 1);
          engine.prefetch_ahead(l + 1, step_ids.data(), weights != nullptr ? step_w.data() : nullptr,
                                int(step_ids.size()), ahead_plan);
        }
        if (host_tier != nullptr)
          for (size_t i = 0; i < ahead_plan.prefetches.size(); i += 5)
            host_access(ahead_plan.prefetches[i], ahead_plan.prefetches[i + 1]);
      }
    }
  }
  return {engine.counters(), engine.simulated_us()};
}

}  // namespace policy
}  // namespace moerun
