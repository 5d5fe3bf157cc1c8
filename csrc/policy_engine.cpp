// Policy engine core: cache structure (slots, partitions, LRU lists) and the per-layer step.
// Eviction order lives in eviction.cpp, prefetch in prefetch.cpp, the miss schedule and cost model
// in cost_model.cpp, adapt rules and windowed metrics in adapt.cpp.
#include "policy_engine.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

namespace moerun {
namespace policy {

static void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

Engine::Engine(const EngineConfig& config) : cfg_(config), cost_(config.cost) {
  L_ = cfg_.num_layers; E_ = cfg_.num_experts; K_ = cfg_.top_k; N_ = cfg_.num_slots;
  check(L_ > 0 && E_ > 0 && K_ > 0 && K_ <= E_,
        "engine needs num_layers > 0, num_experts > 0 and 0 < top_k <= num_experts");
  check(N_ > 0, "engine needs num_slots > 0");
  reset();
}

void Engine::reset() {
  const int keys = L_ * E_;
  clock_ = 0;
  slot_of_.assign(keys, -1);
  last_use_.assign(keys, 0);
  freq_key_.assign(keys, 0.0);
  freq_time_.assign(keys, 0);
  score_.assign(keys, 0.0);
  credit_key_.assign(keys, -INFINITY);
  window_uses_.assign(keys, 0);
  next_use_.assign(keys, INT32_MAX);
  pinned_.assign(keys, 0);
  needed_.assign(keys, 0);
  held_.assign(keys, 0);
  prefetched_.assign(keys, 0);
  lru_prev_.assign(keys, -1);
  lru_next_.assign(keys, -1);
  key_index_.assign(keys, -1);
  member_pos_.assign(keys, -1);
  version_.assign(keys, 0);
  slot_key_.assign(N_, -1);
  free_slots_.clear();
  for (int s = N_ - 1; s >= 0; --s) free_slots_.push_back(s);  // slot 0 handed out first
  staging_.clear();
  pending_releases_.clear();
  staged_count_ = 0;
  ahead_slot_.assign(keys, -1);
  ahead_keys_.clear();
  current_ahead_.clear();
  ahead_cand_.clear();
  ahead_layer_ = -1;
  ahead_target_ = ahead_placed_ = 0;
  ahead_next_ = 0;
  borrowed_.assign(L_, 0);
  lent_keys_.clear();
  prefill_tokens_.assign(keys, 0);
  in_prefill_ = false;
  // The CPU rates' fit starts from one pseudo-job of the starting numbers (one token per expert), so the
  // first measured jobs move the estimate by the EMA weight, not all the way.
  cpu_w_ = 1.0;
  cpu_wt_ = cpu_wtt_ = 1.0;
  cpu_wy_ = cpu_wty_ = cfg_.cost.cpu_us_per_expert + cfg_.cost.cpu_us_per_expert_token;
  const int parts = L_;  // enough for per-layer; flat uses partition 0
  part_cap_.assign(parts, 0);
  part_size_.assign(parts, 0);
  lru_head_.assign(parts, -1);
  lru_tail_.assign(parts, -1);
  part_clock_.assign(parts, 0);
  part_members_.assign(parts, {});
  freq_ring_part_.assign(parts, {});
  freq_ring_pos_part_.assign(parts, 0);
  resident_total_ = 0;
  ent_ring_.assign(L_, {});
  ent_counts_.assign(L_, std::vector<int32_t>(E_, 0));
  ent_pos_.assign(L_, 0);
  last_rebalance_ = 0;
  last_ids_.assign(L_, {});
  affinity_.clear();
  history_.clear();
  hist_ring_.clear();
  hist_pos_.clear();
  history_d_ = 0;
  predicted_.assign(L_, {});
  predicted_scores_.assign(L_, {});
  predicted_for_accuracy_.assign(L_, {});
  predictions_ = predictions_right_ = 0;
  now_us_ = copy_free_us_ = 0.0;
  layer_predicted_us_.assign(L_, 0.0);
  pred_err_sum_ = 0.0;
  pred_err_n_ = 0;
  cum_.assign(8192, Cum{});
  cum_n_ = 0;
  access_log_.clear();
  baseline_log_.clear();
  logged_ = 0;
  firings_.clear();
  firing_count_ = 0;
  total_ = Counters{};
  layer_hits_.assign(L_, 0);
  layer_accesses_.assign(L_, 0);
  cost_ = cfg_.cost;
  set_config(cfg_);
}

void Engine::set_config(const EngineConfig& config) {
  check(config.num_layers == L_ && config.num_experts == E_ && config.top_k == K_ &&
            config.num_slots == N_,
        "set_config cannot change the model shape or the slot count; build a new engine");
  const int total = config.per_layer ? config.total_budget : config.capacity;
  check(config.capacity > 0 && config.capacity <= N_,
        "cache capacity " + std::to_string(config.capacity) + " must be in 1.." +
            std::to_string(N_) + " (the slots available)");
  check(!config.per_layer || (total > 0 && total <= N_),
        "per_layer total_budget " + std::to_string(total) + " must be in 1.." + std::to_string(N_) +
            " (the slots available)");
  check(!config.per_layer || int64_t(config.min_capacity) * L_ <= total,
        "per_layer min_capacity " + std::to_string(config.min_capacity) + " x " +
            std::to_string(L_) + " layers exceeds total_budget " + std::to_string(total));
  const bool structure_changed = config.per_layer != cfg_.per_layer;
  cfg_ = config;
  pinned_.assign(L_ * E_, 0);
  for (int key : cfg_.pinned_keys) {
    check(key >= 0 && key < L_ * E_, "pinned expert key out of range");
    pinned_[key] = 1;
  }
  track_all_ = false;
  for (const AdaptRule& r : cfg_.rules)
    for (const auto& a : r.assignments)
      if (a.first == Param::Eviction) track_all_ = true;
  rule_last_fire_.assign(cfg_.rules.size(), INT64_MIN);
  for (const AdaptRule& r : cfg_.rules)
    if (r.metric == Metric::Drift || r.metric == Metric::UtilizationGini) keep_access_log(r.window);
  if (structure_changed) {
    // Re-thread every resident key into the partition layout of the new structure.
    std::vector<int32_t> keys;
    for (int s = 0; s < N_; ++s)
      if (slot_key_[s] >= 0 && slot_of_[slot_key_[s]] == s) keys.push_back(slot_key_[s]);
    std::sort(keys.begin(), keys.end(), [&](int a, int b) { return last_use_[a] < last_use_[b]; });
    for (auto& m : part_members_) m.clear();
    std::fill(part_size_.begin(), part_size_.end(), 0);
    std::fill(lru_head_.begin(), lru_head_.end(), -1);
    std::fill(lru_tail_.begin(), lru_tail_.end(), -1);
    for (int key : keys) {
      const int p = partition_of(key);
      member_pos_[key] = int(part_members_[p].size());
      part_members_[p].push_back(key);
      ++part_size_[p];
      lru_push_front(key);
    }
  }
  rebuild_order();
  fit_partitions();
}

std::vector<int> Engine::layer_capacities() const {
  if (!cfg_.per_layer) return {part_cap_[0]};
  return std::vector<int>(part_cap_.begin(), part_cap_.end());
}

// -- LRU lists: one per partition, head = most recently used ------------------------------------
void Engine::lru_unlink(int key) {
  const int p = partition_of(key);
  const int pv = lru_prev_[key], nx = lru_next_[key];
  if (pv >= 0) lru_next_[pv] = nx; else lru_head_[p] = nx;
  if (nx >= 0) lru_prev_[nx] = pv; else lru_tail_[p] = pv;
  lru_prev_[key] = lru_next_[key] = -1;
}

void Engine::lru_push_back(int key) {
  const int p = partition_of(key);
  lru_next_[key] = -1;
  lru_prev_[key] = lru_tail_[p];
  if (lru_tail_[p] >= 0) lru_next_[lru_tail_[p]] = key; else lru_head_[p] = key;
  lru_tail_[p] = key;
}

void Engine::lru_push_front(int key) {
  const int p = partition_of(key);
  lru_prev_[key] = -1;
  lru_next_[key] = lru_head_[p];
  if (lru_head_[p] >= 0) lru_prev_[lru_head_[p]] = key; else lru_tail_[p] = key;
  lru_head_[p] = key;
}

int Engine::warm(int key) {
  if (key < 0 || key >= L_ * E_) throw std::out_of_range("warm: key out of range");
  const int p = partition_of(key);
  if (slot_of_[key] >= 0 || part_size_[p] >= part_cap_[p]) return -1;
  const int slot = take_free_slot();
  if (slot >= 0) insert(key, slot, false);
  return slot;
}

int Engine::take_free_slot() {
  if (free_slots_.empty()) return -1;
  const int s = free_slots_.back();
  free_slots_.pop_back();
  return s;
}

void Engine::insert(int key, int slot, bool prefetched) {
  const int p = partition_of(key);
  slot_of_[key] = slot;
  slot_key_[slot] = key;
  member_pos_[key] = int(part_members_[p].size());
  part_members_[p].push_back(key);
  ++part_size_[p];
  ++resident_total_;
  prefetched_[key] = prefetched ? 1 : 0;
  lru_push_front(key);
  ++version_[key];
  if (ordered()) order_push(key);
}

void Engine::remove(int key, bool count_eviction) {
  const int p = partition_of(key);
  const int slot = slot_of_[key];
  ++version_[key];
  lru_unlink(key);
  auto& members = part_members_[p];
  const int pos = member_pos_[key];
  members[pos] = members.back();
  member_pos_[members[pos]] = pos;
  members.pop_back();
  member_pos_[key] = -1;
  --part_size_[p];
  --resident_total_;
  slot_of_[key] = -1;
  slot_key_[slot] = -1;
  prefetched_[key] = 0;
  if (count_eviction) ++total_.evictions;
}

bool Engine::evictable(int key) const { return !pinned_[key] && !needed_[key] && held_[key] == 0; }

void Engine::release(int key) {
  const int slot = slot_of_[key];
  remove(key, true);
  free_slots_.push_back(slot);
  ++total_.releases;
  // Outside a step (set_config), the release goes out with the next plan.
  std::vector<int32_t>& to = out_ != nullptr ? out_->releases : pending_releases_;
  to.push_back(slot);
  to.push_back(key / E_);
  to.push_back(key % E_);
}

void Engine::shrink_partition(int part, int target) {
  while (part_size_[part] > target) {
    const int victim = choose_victim(part);
    if (victim < 0) break;  // only pinned/needed left: the partition stays over until they go
    release(victim);
  }
}

void Engine::touch(int key, int count, float weight_mean, int32_t next_use) {
  const int p = partition_of(key);
  const int64_t pc = part_clock_[p];  // already advanced past this access
  const bool in_order = ordered() && slot_of_[key] >= 0;
  last_use_[key] = pc;
  if (slot_of_[key] >= 0) { lru_unlink(key); lru_push_front(key); }
  if (tracks(Eviction::Lfu)) {
    // Decayed count kept in the log domain relative to the partition clock:
    // effective(t) = exp(freq_key + t * log(decay)), so keys compare without touching all of them.
    // Decayed count stored with the partition clock of its last update (decayed lazily);
    // without decay the counts stay exact integers, so ties break exactly.
    const double d = cfg_.frequency_decay;
    const double kept = d == 1.0 ? freq_key_[key] : freq_key_[key] * std::pow(d, double(pc - freq_time_[key]));
    freq_key_[key] = kept + count;
    freq_time_[key] = pc;
  }
  if (tracks(Eviction::Watermark)) {
    const double logd = std::log(cfg_.credit_decay);
    const double eff = std::exp(credit_key_[key] + double(pc) * logd);
    credit_key_[key] = std::log(eff + count) - double(pc) * logd;
  }
  if (tracks(Eviction::Score))
    score_[key] = cfg_.score_ema_alpha * weight_mean + (1.0 - cfg_.score_ema_alpha) * score_[key];
  if (tracks(Eviction::FreqThreshold)) {
    auto& ring = freq_ring_part_[p];
    const size_t w = size_t(std::max(1, cfg_.freq_window));
    if (ring.size() != w) { ring.assign(w, -1); freq_ring_pos_part_[p] = 0; }
    for (int c = 0; c < count; ++c) {
      int32_t& slot = ring[size_t(freq_ring_pos_part_[p]++ % int64_t(w))];
      if (slot >= 0) --window_uses_[slot];
      slot = key;
      ++window_uses_[key];
    }
  }
  next_use_[key] = next_use;
  if (in_order) { ++version_[key]; order_push(key); }
}

void Engine::step(int layer, const int32_t* ids, const float* weights, int n, Plan& out,
                  const int32_t* next_use, bool prefill) {
  check(layer >= 0 && layer < L_,
        "layer " + std::to_string(layer) + " out of range (model has " + std::to_string(L_) +
            " MoE layers)");
  out.clear();
  out.releases.swap(pending_releases_);  // releases made between steps (set_config) come first
  out_ = &out;
  if (!prefill) end_prefill();  // a decode step: the slots the prefill borrowed go back to the cache
  // Experts streamed ahead for this layer are its hits; for another layer, a prefill cut short left them.
  if (ahead_layer_ == layer) current_ahead_.swap(ahead_keys_);
  release_staged(ahead_keys_);
  ahead_layer_ = -1;
  // Whether this step's accesses update the cache's state (recency, frequencies, prefetch tables).
  const bool learn = !prefill || cfg_.prefill_updates_cache;
  const int part = cfg_.per_layer ? layer : 0;
  const int base = layer * E_;
  // capacity_factor: the most routed pairs one expert takes in this step; the rest are dropped.
  const int token_cap = cfg_.capacity_factor > 0
                            ? std::max(1, int(std::ceil(cfg_.capacity_factor * double(n) / double(E_))))
                            : INT_MAX;
  uniq_.clear(); uniq_count_.clear(); uniq_weight_.clear(); uniq_next_.clear();
  for (int i = 0; i < n; ++i) {
    const int e = ids[i];
    if (e < 0 || e >= E_) {
      for (int k : uniq_) key_index_[k] = -1;
      out_ = nullptr;
      throw std::invalid_argument("expert id " + std::to_string(e) + " out of range (model has " +
                                  std::to_string(E_) + " experts)");
    }
    const int key = base + e;
    int idx = key_index_[key];
    if (idx < 0) {
      idx = key_index_[key] = int(uniq_.size());
      uniq_.push_back(key); uniq_count_.push_back(0); uniq_weight_.push_back(0.f);
      uniq_next_.push_back(INT32_MAX);
    }
    if (uniq_count_[idx] >= token_cap) { ++total_.dropped; continue; }
    ++uniq_count_[idx];
    uniq_weight_[idx] += weights != nullptr ? weights[i] : 1.0f / float(K_);
    if (next_use != nullptr) uniq_next_[idx] = next_use[i];
  }
  const int tokens = (n + K_ - 1) / K_;
  if (learn) record_routing(layer, ids, n);  // prefetch tables, entropy, prediction accuracy
  else score_predictions(layer);  // the prompt's routing teaches no prefetch table, but scores the router
  for (int key : uniq_) { needed_[key] = 1; marked_.push_back(key); }
  if (prefill) {
    in_prefill_ = true;
    ++total_.prefill_steps;
    for (int e = 0; e < E_; ++e) prefill_tokens_[base + e] = 0;
  }

  // Hits and the access clock, in order of first appearance. Experts streamed ahead into staging
  // slots are hits too (not cached: they leave after this step).
  miss_.clear(); miss_tokens_.clear();
  for (size_t i = 0; i < uniq_.size(); ++i) {
    const int key = uniq_[i], count = uniq_count_[i];
    clock_ += count;
    if (learn) part_clock_[part] += count;  // the cache's clock (decay, TTL): decode's accesses only
    total_.accesses += count;
    layer_accesses_[layer] += count;
    if (prefill) { total_.prefill_accesses += count; prefill_tokens_[key] = count; }
    if (!access_log_.empty()) log_access(key, count);
    const int slot = slot_of_[key] >= 0 ? slot_of_[key] : ahead_slot_[key];
    if (slot >= 0) {
      out.hits.push_back(key - base);
      out.hits.push_back(slot);
      total_.hits += count;
      layer_hits_[layer] += count;
      if (prefill) total_.prefill_hits += count;
      if (ahead_slot_[key] >= 0) ++total_.streamed_used;
      if (prefetched_[key]) { prefetched_[key] = 0; ++total_.prefetch_used; }
    } else {
      miss_.push_back(key);
      miss_tokens_.push_back(count);
    }
    if (learn) touch(key, count, uniq_weight_[i] / float(count), uniq_next_[i]);
  }

  // Misses: the schedule says copy or CPU. Decode: a copy takes a free slot of the partition, else
  // evicts the policy's victim, else stages in a spare slot for this step only, else runs on the CPU.
  // Prefill: a copy takes a free slot of the partition's room (cached), else a staging slot (free, or
  // lent by the cache's victim, within the staging share; released after this step), else runs on the
  // CPU; the misses with most tokens get the slots.
  schedule_misses(layer, prefill, prefill ? prefill_room(part) : 0);
  int64_t cpu_tokens = 0;
  int64_t cpu_experts = 0;
  for (size_t j = 0; j < miss_.size(); ++j) {
    const size_t i = prefill ? size_t(miss_order_[j]) : j;
    const int key = miss_[i];
    int slot = -1, victim = -1;
    bool cached = true;
    if (miss_gpu_[i] && prefill) {
      if (cache_room(part)) slot = take_free_slot();
      if (slot < 0) {
        cached = false;
        slot = take_staging_slot(part, victim);
        if (slot >= 0) { staging_.push_back(slot); ++total_.staged; }
      }
    } else if (miss_gpu_[i]) {
      if (part_size_[part] < part_cap_[part]) slot = take_free_slot();
      if (slot < 0) {
        victim = choose_victim(part);
        if (victim >= 0) { slot = slot_of_[victim]; remove(victim, true); }
      }
      if (slot < 0) {
        slot = take_free_slot();
        cached = false;
        if (slot >= 0) { staging_.push_back(slot); ++staged_count_; }
      }
    }
    if (slot < 0) {
      if (miss_gpu_[i]) ++total_.overflow; else if (!prefill) cpu_misses_.push_back(key);
      out.cpu.push_back(key - base);
      total_.cpu_accesses += miss_tokens_[i];
      cpu_tokens += miss_tokens_[i];
      ++cpu_experts;
      ++total_.cpu_experts;
      continue;
    }
    if (cached) insert(key, slot, false); else slot_key_[slot] = key;
    out.fetches.push_back(key - base);
    out.fetches.push_back(slot);
    out.fetches.push_back(victim >= 0 ? victim / E_ : -1);
    out.fetches.push_back(victim >= 0 ? victim % E_ : -1);
    ++total_.demand_fetches;
    total_.bytes_fetched += cfg_.expert_bytes;
  }
  total_.staged_peak = std::max(total_.staged_peak, staged_count_);
  if (!lent_keys_.empty() && !prefill) restore_lent();

  admit_cpu_misses();

  // Recency order of the LRU list follows the access order of this step (misses were inserted
  // after the hits were touched).
  if (learn)
    for (int key : uniq_)
      if (slot_of_[key] >= 0) { lru_unlink(key); lru_push_front(key); }

  if (prefill) {
    // The next layer's experts, streamed while this layer computes: first into slots this step's
    // kernel does not read, then (once this step's staged experts are released below) into theirs.
    stream_ahead(layer, tokens);
  } else {
    issue_prefetches(layer);
  }

  // Staged experts (and those streamed ahead for this layer) leave once this step's kernel is done.
  for (int slot : staging_) {
    const int key = slot_key_[slot];
    slot_key_[slot] = -1;
    free_slots_.push_back(slot);
    out.releases.push_back(slot);
    out.releases.push_back(key / E_);
    out.releases.push_back(key % E_);
  }
  staged_count_ -= int(staging_.size());
  staging_.clear();
  release_staged(current_ahead_);
  if (prefill) stream_ahead(layer, tokens);
  for (int key : marked_) needed_[key] = 0;
  marked_.clear();
  for (int key : uniq_) key_index_[key] = -1;

  if (cfg_.ttl > 0) expire_ttl();
  if (cfg_.eviction == Eviction::Watermark) enforce_watermarks();
  if (cfg_.memory_budget_gb > 0) enforce_memory();

  ++total_.steps;
  if (layer == 0) total_.tokens += tokens;
  out.cpu_pairs = cpu_tokens;
  advance_time(layer, cpu_experts, cpu_tokens);
  if (cfg_.per_layer && cfg_.allocation == Allocation::Entropy && cfg_.rebalance_interval > 0 &&
      clock_ - last_rebalance_ >= cfg_.rebalance_interval) {
    rebalance();
  }
  push_window_record();
  if (!cfg_.rules.empty()) evaluate_rules();
  out_ = nullptr;
}

// A miss the schedule sent to the CPU still competes for a slot: it is copied in the background
// (reported with the prefetches: this step's kernel does not wait for it) when its partition has a
// free slot or the eviction order ranks it above the victim. Without this a cpu_fallback cache
// would never fill, and Fiddler-style placement (the most used experts end up resident) could not
// emerge. LRU always ranks the newest access first, so under LRU only free slots admit: otherwise
// every CPU miss would also cost a copy.
void Engine::admit_cpu_misses() {
  for (int key : cpu_misses_) {
    const int p = partition_of(key);
    int slot = -1, victim = -1;
    if (part_size_[p] < part_cap_[p]) slot = take_free_slot();
    if (slot < 0) {
      if (cfg_.eviction == Eviction::Lru) continue;
      victim = choose_victim(p);
      if (victim < 0 || !(priority(key) > priority(victim))) continue;
      slot = slot_of_[victim];
      remove(victim, true);
    }
    insert(key, slot, false);
    emit_prefetch(key, slot, victim);
    ++total_.admissions;
  }
  cpu_misses_.clear();
}

}  // namespace policy
}  // namespace moerun
