// Eviction order of the policy engine: which resident expert leaves, and the proactive evictions
// (TTL, watermarks, memory trigger). Every policy is "lowest priority first, ties to the least
// recently used"; pinned experts and the experts the current step needs are never candidates.
#include <algorithm>
#include <climits>
#include <functional>
#include <cmath>

#include "policy_engine.h"

namespace moerun {
namespace policy {

double Engine::priority(int key) const {
  switch (cfg_.eviction) {
    case Eviction::Lru: return double(last_use_[key]);
    case Eviction::Lfu: {
      // Every count decays at the same rate, so log(count) - t * log(decay) orders keys without
      // touching the untouched ones; without decay the exact count is used (exact ties).
      const double d = cfg_.frequency_decay;
      if (d == 1.0) return freq_key_[key];
      return std::log(freq_key_[key]) - double(freq_time_[key]) * std::log(d);
    }
    case Eviction::Score: return score_[key];
    case Eviction::FreqThreshold:
      return window_uses_[key] >= cfg_.freq_threshold ? 1.0 : 0.0;  // protected vs not
    case Eviction::Watermark: return credit_key_[key];
    case Eviction::Belady: return -double(next_use_[key]);          // farthest next use first
  }
  return 0.0;
}

int Engine::choose_victim(int part) const {
  if (cfg_.eviction == Eviction::Lru) {
    for (int key = lru_tail_[part]; key >= 0; key = lru_prev_[key])
      if (evictable(key)) return key;
    return -1;
  }
  if (cfg_.eviction == Eviction::FreqThreshold) {
    // Least recently used among the unprotected; when all are protected, least recently used.
    int fallback = -1;
    for (int key = lru_tail_[part]; key >= 0; key = lru_prev_[key]) {
      if (!evictable(key)) continue;
      if (window_uses_[key] < cfg_.freq_threshold) return key;
      if (fallback < 0) fallback = key;
    }
    return fallback;
  }
  // Lazy heap: drop stale entries, set aside the non-evictable ones, put those back after.
  auto& heap = heap_[part];
  const auto greater = std::greater<OrderEntry>();
  int victim = -1;
  heap_side_.clear();
  while (!heap.empty()) {
    const OrderEntry top = heap.front();
    const bool stale = top.version != version_[top.key] || slot_of_[top.key] < 0;
    if (!stale && evictable(top.key)) { victim = top.key; break; }
    std::pop_heap(heap.begin(), heap.end(), greater);
    heap.pop_back();
    if (!stale) heap_side_.push_back(top);
  }
  for (const OrderEntry& e : heap_side_) {
    heap.push_back(e);
    std::push_heap(heap.begin(), heap.end(), greater);
  }
  return victim;
}

void Engine::order_push(int key) {
  const int p = partition_of(key);
  auto& heap = heap_[p];
  const auto greater = std::greater<OrderEntry>();
  if (heap.size() > 2 * size_t(part_size_[p]) + 64) {  // mostly stale: rebuild from the members
    heap.clear();
    for (int k : part_members_[p]) heap.push_back({priority(k), last_use_[k], k, version_[k]});
    std::make_heap(heap.begin(), heap.end(), greater);
    if (slot_of_[key] >= 0) return;  // key is a member: already pushed
  }
  heap.push_back({priority(key), last_use_[key], key, version_[key]});
  std::push_heap(heap.begin(), heap.end(), greater);
}

void Engine::rebuild_order() {
  heap_.assign(part_cap_.size(), {});
  if (!ordered()) return;
  for (size_t p = 0; p < part_members_.size(); ++p)
    for (int key : part_members_[p]) order_push(key);
}

int Engine::global_victim() const {
  if (!cfg_.per_layer) return choose_victim(0);
  // Across partitions the clocks differ, so compare priorities only; ties to the fuller partition.
  int best = -1;
  double best_p = 0.0;
  for (int p = 0; p < L_; ++p) {
    const int v = choose_victim(p);
    if (v < 0) continue;
    const double pr = cfg_.eviction == Eviction::Lru ? -double(part_size_[p]) : priority(v);
    if (best < 0 || pr < best_p) { best = v; best_p = pr; }
  }
  return best;
}

void Engine::expire_ttl() {
  const int parts = cfg_.per_layer ? L_ : 1;
  for (int p = 0; p < parts; ++p) {
    int key = lru_tail_[p];
    while (key >= 0 && part_clock_[p] - last_use_[key] > cfg_.ttl) {
      const int prev = lru_prev_[key];
      if (evictable(key)) release(key);  // pinned and held experts stay
      key = prev;
    }
  }
}

void Engine::enforce_watermarks() {
  const int parts = cfg_.per_layer ? L_ : 1;
  for (int p = 0; p < parts; ++p) {
    const double cap = double(part_cap_[p]);
    if (part_size_[p] > cfg_.high_watermark * cap)
      shrink_partition(p, int(std::floor(cfg_.low_watermark * cap)));
  }
}

void Engine::enforce_memory() {
  const double expert_gb =
      cfg_.expert_size_gb > 0 ? cfg_.expert_size_gb : double(cfg_.expert_bytes) / double(1 << 30);
  if (expert_gb <= 0) return;
  if (resident_total_ * expert_gb <= cfg_.memory_threshold * cfg_.memory_budget_gb) return;
  const double target_gb = (1.0 - cfg_.memory_headroom) * cfg_.memory_budget_gb;
  while (resident_total_ > 0 && resident_total_ * expert_gb > target_gb) {
    const int v = global_victim();
    if (v < 0) break;
    release(v);
  }
}

}  // namespace policy
}  // namespace moerun
