// Cache structure of the policy engine: one flat partition, or one partition per MoE layer whose
// capacities come from an allocation (uniform, or proportional to each layer's routing entropy)
// kept within [min_capacity, max_capacity] and re-fitted by periodic rebalances.
#include <algorithm>
#include <cmath>
#include <vector>

#include "policy_engine.h"

namespace moerun {
namespace policy {

// Largest-remainder split of `total` over `weights`, each share within [lo, hi].
static std::vector<int> allocate(const std::vector<double>& weights, int total, int lo, int hi) {
  const int n = int(weights.size());
  std::vector<int> caps(n, lo);
  int remaining = total - lo * n;
  while (remaining > 0) {
    std::vector<int> open;
    double wsum = 0.0;
    for (int i = 0; i < n; ++i)
      if (caps[i] < hi) { open.push_back(i); wsum += weights[i]; }
    if (open.empty()) break;
    std::vector<std::pair<double, int>> frac;
    int given = 0;
    for (int i : open) {
      const double share = wsum > 0 ? remaining * weights[i] / wsum : double(remaining) / open.size();
      const int whole = std::min(hi - caps[i], int(std::floor(share)));
      caps[i] += whole;
      given += whole;
      frac.push_back({share - std::floor(share), i});
    }
    if (given == 0) {
      // Hand out single slots by largest remainder (ties to the lower layer).
      std::stable_sort(frac.begin(), frac.end(),
                       [](const auto& a, const auto& b) { return a.first > b.first; });
      for (const auto& f : frac) {
        if (given == remaining) break;
        if (caps[f.second] < hi) { ++caps[f.second]; ++given; }
      }
    }
    remaining -= given;
  }
  return caps;
}

void Engine::fit_partitions() {
  if (!cfg_.per_layer) {
    part_cap_[0] = cfg_.capacity;
    for (int p = 1; p < L_; ++p) part_cap_[p] = 0;
    shrink_partition(0, cfg_.capacity);
    return;
  }
  std::vector<double> weights(L_, 1.0);
  if (cfg_.allocation == Allocation::Entropy) {
    bool observed = false;
    for (int l = 0; l < L_; ++l) {
      int64_t n = 0;
      for (int c : ent_counts_[l]) n += c;
      if (n == 0) continue;
      observed = true;
      double h = 0.0;
      for (int c : ent_counts_[l])
        if (c > 0) { const double p = double(c) / n; h -= p * std::log2(p); }
      weights[l] = h + 1e-3;  // a layer with one expert still gets its min_capacity
    }
    if (!observed) std::fill(weights.begin(), weights.end(), 1.0);
  }
  const int hi = cfg_.max_capacity > 0 ? std::min(cfg_.max_capacity, E_) : E_;
  const std::vector<int> caps = allocate(weights, cfg_.total_budget, cfg_.min_capacity, hi);
  for (int l = 0; l < L_; ++l) {
    part_cap_[l] = caps[l];
    shrink_partition(l, caps[l]);
  }
}

void Engine::rebalance() {
  last_rebalance_ = clock_;
  fit_partitions();
}

}  // namespace policy
}  // namespace moerun
