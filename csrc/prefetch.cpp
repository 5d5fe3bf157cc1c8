// Prefetch of the policy engine: routing history (per-layer entropy window, L -> L+d co-occurrence
// within a token, L -> L+1 transition counts), predicted ids from the runtime, and the prefetches a
// step issues for later layers (or, for lookahead, prefetch_ahead issues between steps). A prefetch
// never evicts an expert the current step needs (they are marked `needed_` for the whole step) and
// at most `budget` are issued per step or per prefetch_ahead call.
#include <algorithm>
#include <cmath>

#include "policy_engine.h"

namespace moerun {
namespace policy {

void Engine::observe_prediction(int layer, const int32_t* ids, const float* scores, int n) {
  if (layer < 0 || layer >= L_) return;  // a prediction past the last layer has no use
  auto& pred = predicted_[layer];
  auto& pscore = predicted_scores_[layer];
  auto& acc = predicted_for_accuracy_[layer];
  pred.clear(); pscore.clear();
  for (int i = 0; i < n; ++i) {
    const int e = ids[i];
    if (e < 0 || e >= E_) continue;
    if (std::find(pred.begin(), pred.end(), e) != pred.end()) continue;
    pred.push_back(e);
    pscore.push_back(scores != nullptr ? scores[i] : float(n - i));  // unscored: given order
  }
  acc = pred;
}

void Engine::prefetch_ahead(int layer, const int32_t* ids, const float* scores, int n, Plan& out) {
  out.clear();
  if (layer <= 0 || layer >= L_) return;  // layer 0 has no step before it
  observe_prediction(layer, ids, scores, n);
  // During a prefill the step itself streams the next layer's experts (prefill.cpp).
  if (cfg_.prefetch != Prefetch::Lookahead || in_prefill_) return;
  out_ = &out;
  issue_prefetches(layer - 1);  // its nearest candidates are this layer's predicted ids
  for (int key : marked_) needed_[key] = 0;
  marked_.clear();
  out_ = nullptr;
}

void Engine::score_predictions(int layer) {
  // Prediction accuracy: predicted ids for this layer that were routed (key_index_ is set).
  auto& acc = predicted_for_accuracy_[layer];
  if (!acc.empty()) {
    predictions_ += int64_t(acc.size());
    for (int e : acc) predictions_right_ += key_index_[layer * E_ + e] >= 0;
    acc.clear();
  }
}

void Engine::record_routing(int layer, const int32_t* ids, int n) {
  score_predictions(layer);
  if (cfg_.per_layer && cfg_.allocation == Allocation::Entropy) {
    auto& ring = ent_ring_[layer];
    auto& counts = ent_counts_[layer];
    const size_t w = size_t(std::max(1, cfg_.entropy_window));
    if (ring.size() != w) { ring.assign(w, -1); std::fill(counts.begin(), counts.end(), 0); ent_pos_[layer] = 0; }
    for (int i = 0; i < n; ++i) {
      int32_t& slot = ring[size_t(ent_pos_[layer]++ % int64_t(w))];
      if (slot >= 0) --counts[slot];
      slot = ids[i];
      ++counts[ids[i]];
    }
  }
  const int tokens = n / K_;
  if (cfg_.prefetch == Prefetch::Affinity && layer > 0) {
    if (affinity_.empty()) affinity_.assign(size_t(L_ - 1) * E_ * E_, 0);
    const auto& prev = last_ids_[layer - 1];
    if (int(prev.size()) == n) {
      int32_t* table = &affinity_[size_t(layer - 1) * E_ * E_];
      for (int t = 0; t < tokens; ++t)
        for (int a = 0; a < K_; ++a)
          for (int b = 0; b < K_; ++b) ++table[size_t(prev[t * K_ + a]) * E_ + ids[t * K_ + b]];
    }
  }
  if (cfg_.prefetch == Prefetch::History) {
    const int D = std::max(1, cfg_.lookahead);
    if (history_d_ != D) {
      history_d_ = D;
      history_.assign(size_t(L_) * D * E_ * E_, 0);
      hist_ring_.assign(size_t(L_) * D, {});
      hist_pos_.assign(size_t(L_) * D, 0);
    }
    const size_t w = size_t(std::max(1, cfg_.history_window));
    for (int d = 1; d <= D && layer - d >= 0; ++d) {
      const int src = layer - d;
      const auto& prev = last_ids_[src];
      if (int(prev.size()) != n) continue;
      const size_t rid = size_t(src) * D + (d - 1);
      int32_t* table = &history_[rid * E_ * E_];
      auto& ring = hist_ring_[rid];
      if (ring.size() != w * 2 * K_) ring.assign(w * 2 * K_, -1);
      for (int t = 0; t < tokens; ++t) {
        int32_t* entry = &ring[size_t(hist_pos_[rid]++ % int64_t(w)) * 2 * K_];
        if (entry[0] >= 0)  // forget the oldest token of the window
          for (int a = 0; a < K_; ++a)
            for (int b = 0; b < K_; ++b) --table[size_t(entry[a]) * E_ + entry[K_ + b]];
        for (int a = 0; a < K_; ++a) { entry[a] = prev[t * K_ + a]; entry[K_ + a] = ids[t * K_ + a]; }
        for (int a = 0; a < K_; ++a)
          for (int b = 0; b < K_; ++b) ++table[size_t(entry[a]) * E_ + entry[K_ + b]];
      }
    }
  }
  last_ids_[layer].assign(ids, ids + n);
}

bool Engine::prefetch_one(int key) {
  if (slot_of_[key] >= 0 || ahead_slot_[key] >= 0) return false;
  const int p = partition_of(key);
  int slot = -1, victim = -1;
  if (part_size_[p] < part_cap_[p]) slot = take_free_slot();
  if (slot < 0) {
    victim = choose_victim(p);
    if (victim < 0) return false;
    slot = slot_of_[victim];
    remove(victim, true);
  }
  last_use_[key] = part_clock_[p];
  insert(key, slot, true);
  needed_[key] = 1;  // later prefetches of this step must not evict it
  marked_.push_back(key);
  emit_prefetch(key, slot, victim);
  ++total_.prefetches;
  return true;
}

void Engine::emit_prefetch(int key, int slot, int victim) {
  out_->prefetches.push_back(key / E_);
  out_->prefetches.push_back(key % E_);
  out_->prefetches.push_back(slot);
  out_->prefetches.push_back(victim >= 0 ? victim / E_ : -1);
  out_->prefetches.push_back(victim >= 0 ? victim % E_ : -1);
  total_.bytes_fetched += cfg_.expert_bytes;
}

void Engine::issue_prefetches(int layer) {
  if (cfg_.prefetch == Prefetch::None || cfg_.prefetch_budget <= 0) return;
  cand_.clear();
  cand_score_.clear();
  const int D = std::max(1, cfg_.lookahead);
  switch (cfg_.prefetch) {
    case Prefetch::History:
      for (int d = 1; d <= D && d <= history_d_ && layer + d < L_; ++d) {
        const int32_t* table = &history_[(size_t(layer) * history_d_ + (d - 1)) * E_ * E_];
        hist_sum_.assign(E_, 0);
        for (int key : uniq_) {  // rows are contiguous: sum them
          const int32_t* row = table + size_t(key - layer * E_) * E_;
          for (int b = 0; b < E_; ++b) hist_sum_[b] += row[b];
        }
        const int tbase = (layer + d) * E_;
        for (int b = 0; b < E_; ++b)
          if (hist_sum_[b] > 0 && slot_of_[tbase + b] < 0) {
            cand_.push_back(tbase + b);
            cand_score_.push_back(double(hist_sum_[b]) / d);
          }
      }
      break;
    case Prefetch::Affinity: {
      // L -> L+1 transition probability P(b | a) from cumulative counts; best over this step's a.
      if (layer + 1 >= L_ || affinity_.empty()) break;
      const int32_t* table = &affinity_[size_t(layer) * E_ * E_];
      std::vector<double>& inv_rowsum = cand_score_;  // reused below: filled after this loop
      inv_rowsum.assign(uniq_.size(), 0.0);
      for (size_t u = 0; u < uniq_.size(); ++u) {
        const int32_t* row = table + size_t(uniq_[u] - layer * E_) * E_;
        int64_t rowsum = 0;
        for (int c = 0; c < E_; ++c) rowsum += row[c];
        inv_rowsum[u] = rowsum > 0 ? 1.0 / double(rowsum) : 0.0;
      }
      std::vector<double>& probs = aff_prob_;  // scratch reused across steps
      probs.assign(E_, 0.0);
      for (size_t u = 0; u < uniq_.size(); ++u) {
        const int32_t* row = table + size_t(uniq_[u] - layer * E_) * E_;
        for (int b = 0; b < E_; ++b) probs[b] = std::max(probs[b], row[b] * inv_rowsum[u]);
      }
      cand_score_.clear();
      for (int b = 0; b < E_; ++b) {
        const double best = probs[b];
        if (best > 0 && best >= cfg_.affinity_threshold && slot_of_[(layer + 1) * E_ + b] < 0) {
          cand_.push_back((layer + 1) * E_ + b);
          cand_score_.push_back(best);
        }
      }
      break;
    }
    case Prefetch::Lookahead:
    case Prefetch::Learned:
      // Nearer layers first; within a layer by score (lookahead: the order the ids were given).
      for (int d = 1; d <= D && layer + d < L_; ++d) {
        auto& pred = predicted_[layer + d];
        auto& ps = predicted_scores_[layer + d];
        for (size_t i = 0; i < pred.size(); ++i) {
          if (slot_of_[(layer + d) * E_ + pred[i]] >= 0) continue;  // already resident
          cand_.push_back((layer + d) * E_ + pred[i]);
          cand_score_.push_back(double(D - d) * 1e9 + ps[i]);
        }
        pred.clear();
        ps.clear();
      }
      break;
    case Prefetch::None: break;
  }
  if (cand_.empty()) return;
  // Rank candidates (score desc, ties to the lower key) and issue up to the budget.
  std::vector<int32_t>& order = miss_tokens_;  // scratch: the miss list is done with
  order.resize(cand_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
  // Candidates are all non-resident, so a prefetch fails only when no victim is evictable:
  // ranking the first `budget` is enough.
  const size_t top = std::min(order.size(), size_t(cfg_.prefetch_budget));
  std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int a, int b) {
    return cand_score_[a] > cand_score_[b] || (cand_score_[a] == cand_score_[b] && cand_[a] < cand_[b]);
  });
  for (size_t i = 0; i < top; ++i)
    prefetch_one(cand_[order[i]]);
}

}  // namespace policy
}  // namespace moerun
