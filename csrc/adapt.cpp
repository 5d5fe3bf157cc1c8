// Adapt rules of the policy engine: metrics over sliding windows of accesses, and rules that, when
// their condition holds over a full window, change policy parameters in place (cache contents kept)
// and run triggers. A rule fires at most once per window; every firing is logged.
//
// Counting metrics come from cumulative counters recorded after every step (a ring of Cum). The
// routing metrics (drift, utilization_gini) need which experts were accessed, so the engine keeps an
// access log (one key per routed pair) as long as the longest window a rule takes them over.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>

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
  c.simulated_us = now_us_;
  ++cum_n_;
}

void Engine::keep_access_log(int64_t window) {
  if (window <= int64_t(access_log_.size())) return;
  access_log_.assign(size_t(window), -1);  // a longer log starts over (its baseline too)
  baseline_log_.assign(size_t(window), -1);
  logged_ = 0;
  metric_counts_.assign(size_t(L_) * size_t(E_), 0);
}

void Engine::log_access(int key, int count) {
  const int64_t cap = int64_t(access_log_.size());
  for (int c = 0; c < count; ++c, ++logged_) {
    if (logged_ < cap) baseline_log_[size_t(logged_)] = key;
    access_log_[size_t(logged_ % cap)] = key;
  }
}

// Total variation distance, in [0, 1], between the distribution of (layer, expert) keys over the
// last `window` accesses and over the first `window` since the engine started (its baseline):
// 0 = the routing still spreads over the experts as it did, 1 = it moved to experts it never used.
double Engine::drift(int64_t window) const {
  const int64_t cap = int64_t(access_log_.size());
  if (window <= 0 || window > cap || logged_ < 2 * window) return NAN;
  metric_touched_.clear();
  auto add = [&](int32_t key, int32_t d) {
    if (metric_counts_[size_t(key)] == 0) metric_touched_.push_back(key);
    metric_counts_[size_t(key)] += d;
  };
  for (int64_t i = logged_ - window; i < logged_; ++i) add(access_log_[size_t(i % cap)], 1);
  for (int64_t i = 0; i < window; ++i) add(baseline_log_[size_t(i)], -1);
  int64_t diff = 0;
  for (int32_t key : metric_touched_) {
    diff += std::abs(metric_counts_[size_t(key)]);
    metric_counts_[size_t(key)] = 0;
  }
  return 0.5 * double(diff) / double(window);
}

// Gini coefficient of the access counts of every (layer, expert) of the model over the last
// `window` accesses (experts not accessed count as zero): 0 = every expert used equally, toward 1 =
// the accesses concentrate on few experts.
double Engine::utilization_gini(int64_t window) const {
  const int64_t cap = int64_t(access_log_.size());
  if (window <= 0 || window > cap || logged_ < window) return NAN;
  metric_touched_.clear();
  for (int64_t i = logged_ - window; i < logged_; ++i) {
    const int32_t key = access_log_[size_t(i % cap)];
    if (metric_counts_[size_t(key)]++ == 0) metric_touched_.push_back(key);
  }
  std::vector<int32_t>& counts = metric_touched_;  // reused: keys -> their counts, ascending
  for (int32_t& key : counts) {
    const int32_t k = key;
    key = metric_counts_[size_t(k)];
    metric_counts_[size_t(k)] = 0;
  }
  std::sort(counts.begin(), counts.end());
  const double n = double(L_) * double(E_);
  const double zeros = n - double(counts.size());
  double ranked = 0.0;  // sum of rank * count, ranks 1..n ascending, the zeros first
  for (size_t j = 0; j < counts.size(); ++j) ranked += (zeros + double(j + 1)) * double(counts[j]);
  return 2.0 * ranked / (n * double(window)) - (n + 1.0) / n;
}

double Engine::metric(Metric m, int64_t window) const {
  if (m == Metric::Drift) return drift(window);
  if (m == Metric::UtilizationGini) return utilization_gini(window);
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
    case Metric::CostPerToken: {  // the cost model's time of the MoE layers per token, in µs
      const int64_t tokens = now.tokens - base->tokens;
      return tokens > 0 ? (now.simulated_us - base->simulated_us) / double(tokens) : NAN;
    }
    case Metric::Drift:
    case Metric::UtilizationGini: break;  // above
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
