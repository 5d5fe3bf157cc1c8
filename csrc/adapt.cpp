// Adapt rules of the policy engine: metrics over sliding windows of accesses, and rules that, when
// their condition holds over a full window, change policy parameters in place (cache contents kept)
// and run triggers. A rule fires at most once per window; every firing is logged.
#include <algorithm>
#include <climits>
#include <cmath>

#include "policy_engine.h"

namespace moerun {
namespace policy {

void Engine::push_window_record() {
  Cum& c = cum_[size_t(cum_n_ % int64_t(cum_.size()))];
  c.accesses = total_.accesses;
  c.hits = total_.hits;
  c.evictions = total_.evictions;
  c.prefetches = total_.prefetches;
  c.prefetch_used = total_.prefetch_used;
  c.cpu = total_.cpu_accesses;
  c.fetches = total_.demand_fetches + total_.prefetches;
  c.tokens = total_.tokens;
  c.bytes = total_.bytes_fetched;
  c.observed_steps = total_.observed_steps;
  c.observed_us = total_.observed_us;
  ++cum_n_;
}

double Engine::metric(Metric m, int64_t window) const {
  if (cum_n_ == 0) return NAN;
  const int64_t ring = int64_t(cum_.size());
  const Cum& now = cum_[size_t((cum_n_ - 1) % ring)];
  // Oldest record that still leaves >= window accesses after it; NaN until a window has passed.
  Cum zero{};
  const Cum* base = nullptr;
  for (int64_t i = cum_n_ - 2; i >= std::max<int64_t>(-1, cum_n_ - ring); --i) {
    const Cum& c = i >= 0 ? cum_[size_t(i % ring)] : zero;
    if (now.accesses - c.accesses >= window) { base = &c; break; }
  }
  if (base == nullptr) return NAN;
  const double acc = double(now.accesses - base->accesses);
  const double us = now.observed_us - base->observed_us;
  switch (m) {
    case Metric::HitRate: return double(now.hits - base->hits) / acc;
    case Metric::MissRate: return 1.0 - double(now.hits - base->hits) / acc;
    case Metric::EvictionRate: return double(now.evictions - base->evictions) / acc;
    case Metric::PrefetchAccuracy: {
      const int64_t issued = now.prefetches - base->prefetches;
      return issued > 0 ? double(now.prefetch_used - base->prefetch_used) / double(issued) : NAN;
    }
    case Metric::CpuShare: return double(now.cpu - base->cpu) / acc;
    case Metric::TransferGbps: return us > 0 ? double(now.bytes - base->bytes) / us / 1e3 : NAN;
    case Metric::FetchesPerToken: {
      const int64_t tokens = now.tokens - base->tokens;
      return tokens > 0 ? double(now.fetches - base->fetches) / double(tokens) : NAN;
    }
    case Metric::LayerLatencyMs: {
      const int64_t steps = now.observed_steps - base->observed_steps;
      return steps > 0 ? us / double(steps) / 1e3 : NAN;
    }
  }
  return NAN;
}

static bool compare(double v, Op op, double t) {
  switch (op) {
    case Op::Lt: return v < t;
    case Op::Le: return v <= t;
    case Op::Gt: return v > t;
    case Op::Ge: return v >= t;
    case Op::Eq: return v == t;
    case Op::Ne: return v != t;
  }
  return false;
}

void Engine::evaluate_rules() {
  for (size_t r = 0; r < cfg_.rules.size(); ++r) {
    const AdaptRule& rule = cfg_.rules[r];
    if (rule_last_fire_[r] != INT64_MIN && clock_ - rule_last_fire_[r] < rule.window) continue;
    const double v = metric(rule.metric, rule.window);
    if (std::isnan(v) || !compare(v, rule.op, rule.threshold)) continue;
    rule_last_fire_[r] = clock_;
    ++firing_count_;
    if (firings_.size() < 1024) firings_.push_back({clock_, int(r), v});
    const AdaptRule fired = rule;  // apply() may replace cfg_.rules' storage
    for (const auto& a : fired.assignments) apply(a.first, a.second);
    for (Trigger t : fired.triggers) {
      switch (t) {
        case Trigger::EvictTtl: if (cfg_.ttl > 0) expire_ttl(); break;
        case Trigger::EvictMemory: if (cfg_.memory_budget_gb > 0) enforce_memory(); break;
        case Trigger::ResetStats: {
          const int64_t keep_clock = clock_;
          total_ = Counters{};
          std::fill(layer_hits_.begin(), layer_hits_.end(), 0);
          std::fill(layer_accesses_.begin(), layer_accesses_.end(), 0);
          clock_ = keep_clock;
          break;
        }
        case Trigger::RebalancePerLayer: if (cfg_.per_layer) rebalance(); break;
      }
    }
  }
}

void Engine::apply(Param p, double v) {
  switch (p) {
    case Param::Capacity:
      cfg_.capacity = std::max(1, std::min(N_, int(v)));
      if (!cfg_.per_layer) fit_partitions();
      break;
    case Param::Eviction: cfg_.eviction = Eviction(int(v)); rebuild_order(); break;
    case Param::FrequencyDecay: cfg_.frequency_decay = v; rebuild_order(); break;
    case Param::FreqThreshold: cfg_.freq_threshold = v; break;
    case Param::FreqWindow: cfg_.freq_window = std::max(1, int(v)); break;
    case Param::ScoreEmaAlpha: cfg_.score_ema_alpha = v; break;  // takes effect per touch
    case Param::Ttl: cfg_.ttl = int64_t(v); break;
    case Param::HighWatermark: cfg_.high_watermark = v; break;
    case Param::LowWatermark: cfg_.low_watermark = v; break;
    case Param::CreditDecay: cfg_.credit_decay = v; rebuild_order(); break;
    case Param::MemoryBudgetGb: cfg_.memory_budget_gb = v; break;
    case Param::MemoryThreshold: cfg_.memory_threshold = v; break;
    case Param::MemoryHeadroom: cfg_.memory_headroom = v; break;
    case Param::PrefetchStrategy: cfg_.prefetch = Prefetch(int(v)); break;
    case Param::PrefetchBudget: cfg_.prefetch_budget = std::max(0, int(v)); break;
    case Param::PrefetchLookahead: cfg_.lookahead = std::max(1, int(v)); break;
    case Param::AffinityThreshold: cfg_.affinity_threshold = v; break;
    case Param::ScheduleMode: cfg_.schedule = Schedule(int(v)); break;
    case Param::OffloadThresholdMs: cfg_.offload_threshold_ms = v; break;
    case Param::PriorityRouting: cfg_.priority_routing = v != 0; break;
  }
}

}  // namespace policy
}  // namespace moerun
