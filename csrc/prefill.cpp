// Prefill steps of the policy engine: where a prompt's experts go when the cache has no room for them.
// A prefill step routes most of a layer's experts. Copies into the cache's free room are cached (they
// cost the decode working set nothing); the rest go through staging slots, at most
// EngineConfig::prefill_staging x num_slots at once, taken from free slots and then from the cache's
// eviction victims (lent: the cache does not refill them until the prefill ends), and released after
// the layer step that reads them. Whatever gets no slot runs on the CPU. Unless prefill accesses update
// the cache's state, the lent experts are copied back when decoding resumes (restore_lent). While a
// layer computes, the next layer's experts are streamed ahead into staging slots once this layer's
// routing shows that nearly every expert is needed (kStreamCoverage); under the hybrid schedule only as
// many as the cost model balances against the CPU's share.
#include <algorithm>
#include <cmath>

#include "policy_engine.h"

namespace moerun {
namespace policy {

// Stream the next layer's non-resident experts ahead when this layer's step routed at least this share
// of its experts: tokens spread over the experts alike from one layer to the next, so the next layer
// then needs nearly all of them too, and copying the few it does not need costs less than waiting for
// its routing (under uniform routing of T tokens, top-k of E, the share is 1 - (1 - k/E)^T: 0.9 at
// T = 34 for Qwen1.5-MoE's 60 experts, top-4). Below it, the next layer's misses are copied on demand.
constexpr double kStreamCoverage = 0.9;

int Engine::take_staging_slot(int part, int& victim) {
  victim = -1;
  if (staged_count_ >= staging_limit()) return -1;
  int slot = take_free_slot();
  if (slot < 0) {
    victim = choose_victim(part);
    if (victim < 0) return -1;
    slot = slot_of_[victim];
    remove(victim, true);
    lent_keys_.push_back(victim);
    ++borrowed_[part];
    ++total_.borrowed;
  }
  ++staged_count_;
  total_.staged_peak = std::max(total_.staged_peak, staged_count_);
  return slot;
}

int Engine::prefill_room(int part) const {
  const int free = int(free_slots_.size());
  const int cache_free = std::max(0, std::min(part_cap_[part] - part_size_[part] - borrowed_[part], free));
  const int staging_left = std::max(0, staging_limit() - staged_count_);
  return cache_free + std::min(staging_left, free - cache_free + part_size_[part]);
}

void Engine::release_staged(std::vector<int32_t>& keys) {
  std::vector<int32_t>& to = out_ != nullptr ? out_->releases : pending_releases_;
  for (int key : keys) {
    const int slot = ahead_slot_[key];
    if (slot < 0) continue;
    ahead_slot_[key] = -1;
    slot_key_[slot] = -1;
    free_slots_.push_back(slot);
    --staged_count_;
    to.push_back(slot);
    to.push_back(key / E_);
    to.push_back(key % E_);
  }
  keys.clear();
}

void Engine::end_prefill() {
  if (!in_prefill_) return;
  release_staged(current_ahead_);
  release_staged(ahead_keys_);
  ahead_layer_ = -1;
  std::fill(borrowed_.begin(), borrowed_.end(), 0);
  in_prefill_ = false;
  if (cfg_.prefill_updates_cache) lent_keys_.clear();  // the lent slots come back empty
}

void Engine::restore_lent() {
  // The prompt left the cache's state as decoding left it; its contents too: the lent experts come back
  // (background copies), the last evicted first, each at the cold end of the LRU order (the ordered
  // evictions rank them by the state they kept), so the order is the one before the prompt. Called once
  // the first decode step's misses have their slots: a copy of this plan lands after its kernel, so an
  // expert it brings back cannot be one of the step's hits, and the misses come first.
  for (auto it = lent_keys_.rbegin(); it != lent_keys_.rend(); ++it) {
    const int key = *it, p = partition_of(key);
    if (slot_of_[key] >= 0 || part_size_[p] >= part_cap_[p]) continue;
    const int slot = take_free_slot();
    if (slot < 0) break;
    insert(key, slot, false);
    lru_unlink(key);
    lru_push_back(key);
    needed_[key] = 1;  // not a victim of this step's later copies
    marked_.push_back(key);
    emit_prefetch(key, slot, -1);
    ++total_.restored;
  }
  lent_keys_.clear();
}

void Engine::stream_ahead(int layer, int tokens) {
  const int next = layer + 1;
  if (ahead_layer_ != next) {  // the step's first call: choose what to stream and how much
    ahead_layer_ = next;
    ahead_target_ = ahead_placed_ = 0;
    ahead_next_ = 0;
    ahead_cand_.clear();
    if (next >= L_ || cfg_.schedule == Schedule::CpuFallback || uniq_.empty() ||
        double(uniq_.size()) < kStreamCoverage * double(E_))
      return;
    for (int e = 0; e < E_; ++e)
      if (slot_of_[next * E_ + e] < 0) ahead_cand_.push_back(next * E_ + e);
    // The experts that took most tokens in this layer's previous prefill step first (a chunked prompt's
    // earlier chunks); under the hybrid schedule the rest are left to the CPU.
    std::stable_sort(ahead_cand_.begin(), ahead_cand_.end(),
                     [&](int a, int b) { return prefill_tokens_[a] > prefill_tokens_[b]; });
    ahead_target_ = int(ahead_cand_.size());
    if (cfg_.schedule == Schedule::Hybrid) {
      // Copies and CPU experts finish together: n copies against (m - n) CPU experts of tau tokens each.
      const double tau = double(tokens) * K_ / double(uniq_.size());
      const double cpu = cpu_cost_us(1, tau), copy = copy_us();
      ahead_target_ = int(std::ceil(double(ahead_cand_.size()) * cpu / (cpu + copy)));
    }
  }
  while (ahead_placed_ < ahead_target_ && ahead_next_ < ahead_cand_.size()) {
    const int key = ahead_cand_[ahead_next_];
    if (slot_of_[key] >= 0 || ahead_slot_[key] >= 0) { ++ahead_next_; continue; }
    const int p = partition_of(key);
    int slot = -1, victim = -1;
    if (cache_room(p)) slot = take_free_slot();
    if (slot >= 0) {
      insert(key, slot, false);
      needed_[key] = 1;  // later copies of this step must not evict it
      marked_.push_back(key);
    } else {
      slot = take_staging_slot(p, victim);
      if (slot < 0) break;  // the staging share is in use: the rest waits for the next call or its step
      ahead_slot_[key] = slot;
      slot_key_[slot] = key;
      ahead_keys_.push_back(key);
    }
    emit_prefetch(key, slot, victim);
    out_->stream_ahead = true;
    ++total_.streamed;
    ++ahead_placed_;
    ++ahead_next_;
  }
}

}  // namespace policy
}  // namespace moerun
