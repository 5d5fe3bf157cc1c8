// The native policy engine: turns a compiled policy into per-layer decisions (hit, fetch into a
// slot evicting a victim, run on CPU, prefetch for later layers). Plain C++ with no torch or Python:
// the same object drives the live runtime (through policy_engine_binding.cpp) and offline replay
// (trace_replay.cpp), so what replay predicts is what the runtime does.
//
// Keys are (layer, expert) flattened as key = layer * num_experts + expert. The engine owns slot
// numbering 0..num_slots-1; the runtime mirrors fetches/releases into the arena's slot table.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moerun {
namespace policy {

// The policy vocabularies. Each enum's names, in enum order, are listed beside it: the binding
// exports them (moerun._C.policy_vocabulary()) and a test holds them equal to the language's lists
// (moerun/policy/ir.py), which map names to these values by position.
enum class Eviction : int { Lru = 0, Lfu, Score, FreqThreshold, Watermark, Belady };
inline constexpr const char* kEvictionNames[] = {"lru", "lfu", "score", "freq_threshold", "watermark", "belady"};
enum class Prefetch : int { None = 0, History, Affinity, Lookahead, Learned };
inline constexpr const char* kPrefetchNames[] = {"none", "history", "affinity", "lookahead", "learned"};
enum class Schedule : int { GpuOnly = 0, CpuFallback, Hybrid };
inline constexpr const char* kScheduleNames[] = {"gpu_only", "cpu_fallback", "hybrid"};
enum class Allocation : int { Uniform = 0, Entropy };
inline constexpr const char* kAllocationNames[] = {"uniform", "entropy"};
enum class Metric : int {
  HitRate = 0, MissRate, EvictionRate, PrefetchAccuracy, CpuShare, TransferGbps, FetchesPerToken,
  LayerLatencyMs, Drift, UtilizationGini, CostPerToken
};
inline constexpr const char* kMetricNames[] = {
    "hit_rate", "miss_rate", "eviction_rate", "prefetch_accuracy", "cpu_share", "transfer_gbps",
    "fetches_per_token", "layer_latency_ms", "drift", "utilization_gini", "cost_per_token"};
enum class Op : int { Lt = 0, Le, Gt, Ge, Eq, Ne };
inline constexpr const char* kOpNames[] = {"<", "<=", ">", ">=", "==", "!="};
// Parameters an adapt rule may assign. Enum-valued ones carry the enum's integer value.
enum class Param : int {
  Capacity = 0, Eviction, FrequencyDecay, FreqThreshold, FreqWindow, ScoreEmaAlpha, Ttl,
  HighWatermark, LowWatermark, CreditDecay, MemoryBudgetGb, MemoryThreshold, MemoryHeadroom,
  PrefetchStrategy, PrefetchBudget, PrefetchLookahead, AffinityThreshold, ScheduleMode,
  OffloadThresholdMs, PriorityRouting
};
inline constexpr const char* kParamNames[] = {
    "cache.capacity", "cache.eviction", "cache.frequency_decay", "cache.freq_threshold", "cache.freq_window",
    "cache.score_ema_alpha", "cache.ttl", "cache.high_watermark", "cache.low_watermark", "cache.credit_decay",
    "cache.memory_budget_gb", "cache.memory_threshold", "cache.memory_headroom", "prefetch.strategy",
    "prefetch.budget", "prefetch.lookahead", "prefetch.affinity_threshold", "schedule.mode",
    "schedule.offload_threshold_ms", "schedule.priority_routing"};
enum class Trigger : int { EvictTtl = 0, EvictMemory, ResetStats, RebalancePerLayer };
inline constexpr const char* kTriggerNames[] = {"evict_ttl", "evict_memory", "reset_stats", "rebalance_per_layer"};

static_assert(sizeof(kEvictionNames) / sizeof(char*) == int(Eviction::Belady) + 1, "an eviction has no name");
static_assert(sizeof(kPrefetchNames) / sizeof(char*) == int(Prefetch::Learned) + 1, "a prefetch has no name");
static_assert(sizeof(kScheduleNames) / sizeof(char*) == int(Schedule::Hybrid) + 1, "a schedule has no name");
static_assert(sizeof(kAllocationNames) / sizeof(char*) == int(Allocation::Entropy) + 1, "an allocation has no name");
static_assert(sizeof(kMetricNames) / sizeof(char*) == int(Metric::CostPerToken) + 1, "a metric has no name");
static_assert(sizeof(kOpNames) / sizeof(char*) == int(Op::Ne) + 1, "an op has no name");
static_assert(sizeof(kParamNames) / sizeof(char*) == int(Param::PriorityRouting) + 1, "a param has no name");
static_assert(sizeof(kTriggerNames) / sizeof(char*) == int(Trigger::RebalancePerLayer) + 1, "a trigger has no name");

struct AdaptRule {
  Metric metric = Metric::HitRate;
  Op op = Op::Lt;
  double threshold = 0.0;
  int64_t window = 100;  // accesses the metric is taken over
  std::vector<std::pair<Param, double>> assignments;
  std::vector<Trigger> triggers;  // rebalances are triggers too (RebalancePerLayer)
};

// The cost model's numbers; the engine re-estimates the bandwidth and the CPU's two rates from
// observed timings. A CPU expert over t tokens costs cpu_us_per_expert + t * cpu_us_per_expert_token
// (reading its weights once, then the tokens' arithmetic): a decode step's one token per expert and a
// prefill's hundreds cost very differently per token.
struct CostParams {
  double h2d_bytes_per_us = 25e3;       // host->GPU copy bandwidth (25 GB/s)
  double cpu_us_per_expert = 300;        // CPU time of one expert whatever its tokens (its weights read once)
  double cpu_us_per_expert_token = 100;  // CPU time of one expert for each token it runs
  double copy_latency_us = 10;           // fixed cost per copy
  double gpu_layer_us = 50;              // GPU compute of one MoE layer step (not re-estimated)
  double ema = 0.2;                      // weight of a new observation in the re-estimate
};

struct EngineConfig {
  int num_layers = 0, num_experts = 0, top_k = 0, num_slots = 0;
  int64_t expert_bytes = 0;
  // cache
  int capacity = 0;  // resolved (> 0, <= num_slots)
  Eviction eviction = Eviction::Lru;
  double frequency_decay = 1.0;
  double freq_threshold = 2.0;
  int freq_window = 100;
  double score_ema_alpha = 0.3;
  std::vector<int> pinned_keys;
  int64_t ttl = 0;
  double high_watermark = 0.9, low_watermark = 0.7, credit_decay = 0.95;
  double memory_budget_gb = 0.0, memory_threshold = 0.9, memory_headroom = 0.1;
  double expert_size_gb = 0.0;  // 0 -> expert_bytes
  // Switch/GShard token capacity: an expert takes at most ceil(capacity_factor * pairs / num_experts)
  // of a step's routed pairs; the rest are dropped (not run, not accesses). 0 = no limit. Dropping
  // tokens changes the model's output, so only replay runs it (the runtime refuses such a policy).
  double capacity_factor = 0.0;
  // prefetch
  Prefetch prefetch = Prefetch::None;
  int prefetch_budget = 0, lookahead = 1;
  double affinity_threshold = 0.1;
  int history_window = 64;
  // schedule
  Schedule schedule = Schedule::GpuOnly;
  double offload_threshold_ms = 0.0;
  bool priority_routing = true;
  // prefill (steps marked prefill): the share of the slots that may hold experts the cache does not
  // keep (staged for one layer step, or streamed ahead for the next layer), taken from free slots and
  // then from the cache's eviction victims; and whether prefill accesses update the cache's state
  // (recency, frequencies, scores, prefetch tables); when it does not, the experts evicted to lend slots
  // are copied back (background prefetches) when decoding resumes, each in its place in the eviction order.
  double prefill_staging = 0.25;
  bool prefill_updates_cache = false;
  // per-layer partitions (flat cache when !per_layer)
  bool per_layer = false;
  Allocation allocation = Allocation::Uniform;
  int total_budget = 0, min_capacity = 1, max_capacity = 0;
  int64_t rebalance_interval = 0;
  int entropy_window = 1000;
  // adapt + monitor
  std::vector<AdaptRule> rules;
  CostParams cost;
};

// One step's decisions. Buffers are reused across steps (no allocation once warm).
struct Plan {
  std::vector<int32_t> hits;        // (expert, slot) pairs, flattened
  std::vector<int32_t> fetches;     // (expert, slot, victim_layer, victim_expert)
  std::vector<int32_t> cpu;         // expert
  std::vector<int32_t> prefetches;  // (layer, expert, slot, victim_layer, victim_expert)
  std::vector<int32_t> releases;    // (slot, layer, expert): leave the arena after this step's kernel
  int64_t cpu_pairs = 0;            // routed (token, expert) pairs of the CPU experts
  double predicted_us = 0.0;        // cost model's estimate of this layer step
  // A prefill step's prefetches are the next layer's experts streamed ahead: issued at once after the
  // kernel launch (not queued behind the in-flight limit of background prefetches).
  bool stream_ahead = false;
  void clear() {
    hits.clear(); fetches.clear(); cpu.clear(); prefetches.clear(); releases.clear();
    cpu_pairs = 0;
    predicted_us = 0.0;
    stream_ahead = false;
  }
};

struct Counters {
  int64_t steps = 0, tokens = 0, accesses = 0, hits = 0, cpu_accesses = 0;
  int64_t demand_fetches = 0, prefetches = 0, prefetch_used = 0, evictions = 0, releases = 0;
  int64_t cpu_experts = 0, overflow = 0, bytes_fetched = 0;
  int64_t admissions = 0;  // CPU-run misses copied in the background to stay cached
  int64_t dropped = 0;     // routed pairs over an expert's token capacity (capacity_factor)
  double observed_us = 0.0;  // sum of observed layer times
  int64_t observed_steps = 0;
  // prefill steps: their accesses and hits (also in the totals above), copies into staging slots (not
  // cached), the next layer's experts streamed ahead and how many of them were routed, and cached
  // experts evicted to lend their slot to staging
  int64_t prefill_steps = 0, prefill_accesses = 0, prefill_hits = 0;
  int64_t staged = 0, streamed = 0, streamed_used = 0, borrowed = 0;
  int64_t restored = 0;  // lent experts copied back when decoding resumed (prefill_updates_cache false)
  int staged_peak = 0;  // most slots holding staged experts at once
};

struct Firing {
  int64_t access;  // engine clock (accesses) when the rule fired
  int rule;
  double value;    // metric value that fired it
};

class Engine {
 public:
  explicit Engine(const EngineConfig& config);

  // Decide one layer step. ids/weights: n = tokens * top_k routed pairs. next_use (replay only,
  // may be null): per pair, the global step index of that key's next access (INT32_MAX = never).
  // The plan is written into `out` (its buffers are reused: no allocation once warm).
  // prefill: the step is a prefill's (more than one new token per sequence): see EngineConfig's
  // prefill settings and docs/design.md, Prefill.
  void step(int layer, const int32_t* ids, const float* weights, int n, Plan& out,
            const int32_t* next_use = nullptr, bool prefill = false);
  // Predicted ids (and optional scores) for a later layer; consumed by lookahead/learned prefetch.
  void observe_prediction(int layer, const int32_t* ids, const float* scores, int n);
  // Lookahead between steps: ids predicted for `layer` from the hidden state the layer before it
  // produced (its router on that state), known once that step is done. Records them for the
  // prediction accuracy and, under lookahead prefetch, issues prefetches of the ones not resident
  // (up to the budget) into `out.prefetches`; everything else in `out` is cleared.
  void prefetch_ahead(int layer, const int32_t* ids, const float* scores, int n, Plan& out);
  // Measured times of the last step of `layer`; re-estimates the cost model.
  // cpu_experts: the experts of the CPU job that took cpu_us (0 = one per token, as before).
  void observe_timing(int layer, double layer_us, double copy_us, int64_t copy_bytes, double cpu_us,
                      int64_t cpu_expert_tokens, int64_t cpu_experts = 0);
  // The cost model's CPU time of `experts` experts running `tokens` routed tokens in all.
  double cpu_cost_us(double experts, double tokens) const {
    return experts * cost_.cpu_us_per_expert + tokens * cost_.cpu_us_per_expert_token;
  }
  // Slots the prefill may hold staged experts in at once (EngineConfig::prefill_staging).
  int staging_limit() const { return int(cfg_.prefill_staging * double(N_)); }
  int staged_now() const { return staged_count_; }
  // Places key in a free slot of its partition without counting an access (the arena filled at
  // start-up when it holds every expert). Returns the slot, or -1 when resident or no room.
  int warm(int key);
  void set_config(const EngineConfig& config);  // hot swap: contents kept, partitions re-fit
  void reset();
  // Holds keep a resident key out of every eviction while its bytes are in use outside the engine
  // (the host tier: a copy to the GPU or a CPU job reading them). Counted: one unhold per hold.
  void hold(int key) { ++held_[key]; }
  void unhold(int key) { --held_[key]; }
  int held(int key) const { return held_[key]; }

  const EngineConfig& config() const { return cfg_; }
  const Counters& counters() const { return total_; }
  const std::vector<Firing>& firings() const { return firings_; }
  int64_t firing_count() const { return firing_count_; }
  std::vector<int> layer_capacities() const;
  std::vector<int64_t> layer_hits() const { return layer_hits_; }
  std::vector<int64_t> layer_accesses() const { return layer_accesses_; }
  int resident() const { return resident_total_; }
  int lookup(int layer, int expert) const { return slot_of_[layer * E_ + expert]; }
  double prediction_error() const;    // mean |predicted - observed| / observed of layer times
  double prediction_accuracy() const; // lookahead/learned: predicted ids that were routed
  const CostParams& cost() const { return cost_; }
  double simulated_us() const { return now_us_; }
  double metric(Metric m, int64_t window) const;  // windowed metric (NaN when undefined)
  // Longest window the routing metrics (drift, utilization_gini) can be taken over: the longest
  // window of the rules that use them, or the one asked for with keep_access_log.
  int64_t access_log_capacity() const { return int64_t(access_log_.size()); }
  void keep_access_log(int64_t window);  // grow the access log to `window` accesses (0 = unchanged)

 private:
  // -- cache structure (policy_engine.cpp) --
  int partition_of(int key) const { return cfg_.per_layer ? key / E_ : 0; }
  void insert(int key, int slot, bool prefetched);
  void remove(int key, bool count_eviction);  // frees the slot
  int take_free_slot();
  bool evictable(int key) const;
  void release(int key);                      // proactive eviction, reported in plan.releases
  void shrink_partition(int part, int target);
  void fit_partitions();
  void touch(int key, int count, float weight_mean, int32_t next_use);
  void lru_unlink(int key);
  void lru_push_front(int key);
  void lru_push_back(int key);
  int global_victim() const;
  void advance_time(int layer, int64_t cpu_experts, int64_t cpu_tokens);
  bool tracks(Eviction e) const { return track_all_ || cfg_.eviction == e; }
  // -- eviction (eviction.cpp) --
  int choose_victim(int part) const;          // -1 when nothing is evictable
  double priority(int key) const;             // lower = evicted first
  void expire_ttl();
  void enforce_watermarks();
  void enforce_memory();
  // -- prefetch (prefetch.cpp) --
  void record_routing(int layer, const int32_t* ids, int n);
  void score_predictions(int layer);  // the lookahead/learned predictions for this layer against its routing
  void issue_prefetches(int layer);
  bool prefetch_one(int key);
  void admit_cpu_misses();
  // Appends a background copy (layer, expert, slot, victim layer, victim expert) to the plan.
  void emit_prefetch(int key, int slot, int victim);
  // -- schedule + cost model (cost_model.cpp) --
  void schedule_misses(int layer, bool prefill, int room);
  double copy_us() const { return cost_.copy_latency_us + double(cfg_.expert_bytes) / cost_.h2d_bytes_per_us; }
  // -- prefill staging (prefill.cpp) --
  bool cache_room(int part) const { return part_size_[part] + borrowed_[part] < part_cap_[part]; }
  int take_staging_slot(int part, int& victim);
  int prefill_room(int part) const;
  void stream_ahead(int layer, int tokens);
  void release_staged(std::vector<int32_t>& keys);  // experts streamed ahead leave their slots
  void end_prefill();
  void restore_lent();
  void fit_cpu_rates();
  // -- adapt (adapt.cpp) --
  void push_window_record();
  void log_access(int key, int count);  // the access log of drift and utilization_gini
  double drift(int64_t window) const;
  double utilization_gini(int64_t window) const;
  void evaluate_rules();
  void apply(Param p, double v);
  void rebalance();

  EngineConfig cfg_;
  CostParams cost_;
  int L_, E_, K_, N_;
  int64_t clock_ = 0;  // accesses so far (one per routed pair)

  // per key
  std::vector<int32_t> slot_of_;     // -1 = not resident
  std::vector<int64_t> last_use_;    // clock at last access
  std::vector<double> freq_key_;     // lfu: decayed count as of freq_time_
  std::vector<int64_t> freq_time_;   // lfu: partition clock of the count's last update
  std::vector<double> score_;        // score: EMA of gate weight mass
  std::vector<double> credit_key_;   // watermark: log-domain decayed credit
  std::vector<int32_t> window_uses_; // freq_threshold: uses in the last freq_window accesses
  std::vector<int32_t> next_use_;    // belady
  std::vector<uint8_t> pinned_, needed_, prefetched_;
  std::vector<int32_t> held_;        // hold() counts
  std::vector<int32_t> lru_prev_, lru_next_;  // per-partition LRU lists (for ttl and lru)
  // per slot
  std::vector<int32_t> slot_key_;    // resident key, -1 = free
  std::vector<int32_t> free_slots_;
  std::vector<int32_t> staging_;     // slots holding this step's uncached (staged) experts
  // prefill staging: slots holding staged experts (this step's and the next layer's streamed ones),
  // per key the slot it is streamed ahead into (-1 = none), the keys streamed ahead and their layer,
  // per partition the cached experts evicted to lend slots to the prefill (the cache does not refill
  // them until the prefill ends), per key the tokens its layer's last prefill step routed to it
  int staged_count_ = 0;
  std::vector<int32_t> ahead_slot_;
  std::vector<int32_t> ahead_keys_;    // streamed ahead for ahead_layer_
  std::vector<int32_t> current_ahead_; // streamed ahead for the layer of the running step
  std::vector<int32_t> ahead_cand_;    // the next layer's experts to stream, in order
  int ahead_layer_ = -1, ahead_target_ = 0, ahead_placed_ = 0;
  size_t ahead_next_ = 0;
  std::vector<int32_t> borrowed_;
  std::vector<int32_t> lent_keys_;   // the cached experts evicted to lend their slots, in eviction order
  std::vector<int32_t> prefill_tokens_;
  bool in_prefill_ = false;
  std::vector<int32_t> miss_order_;  // prefill: misses, most tokens first
  // per partition
  std::vector<int32_t> part_cap_, part_size_, lru_head_, lru_tail_;  // head = most recent
  std::vector<std::vector<int32_t>> part_members_;
  // Eviction order for policies whose priority only changes when a key is touched (lfu, score,
  // watermark, belady): a lazy min-heap of (priority, last_use, key) per partition. Entries carry
  // the key's version; any change bumps it, so stale entries are dropped when they surface.
  struct OrderEntry {
    double priority;
    int64_t last_use;
    int32_t key;
    uint32_t version;
    bool operator>(const OrderEntry& o) const {
      if (priority != o.priority) return priority > o.priority;
      if (last_use != o.last_use) return last_use > o.last_use;
      return key > o.key;
    }
  };
  mutable std::vector<std::vector<OrderEntry>> heap_;
  mutable std::vector<OrderEntry> heap_side_;
  std::vector<uint32_t> version_;
  bool ordered() const {
    return cfg_.eviction != Eviction::Lru && cfg_.eviction != Eviction::FreqThreshold;
  }
  void order_push(int key);
  void rebuild_order();
  std::vector<int32_t> member_pos_;
  int resident_total_ = 0;

  // entropy allocation: per layer ring of the last entropy_window routed experts
  std::vector<std::vector<int32_t>> ent_ring_;
  std::vector<std::vector<int32_t>> ent_counts_;
  std::vector<int64_t> ent_pos_;
  int64_t last_rebalance_ = 0;

  // prefetch state
  std::vector<std::vector<int32_t>> last_ids_;  // per layer: ids of its latest step [T*K]
  std::vector<int32_t> affinity_;               // [L-1][E][E] transition counts L -> L+1
  std::vector<int32_t> history_;                // [L][lookahead][E][E] windowed co-occurrence
  std::vector<std::vector<int32_t>> hist_ring_; // per (layer, d): ring of (src, dst) id pairs
  std::vector<int64_t> hist_pos_;
  int history_d_ = 0;                           // lookahead depth history_ was sized for
  std::vector<std::vector<int32_t>> predicted_; // per layer: pending predicted ids
  std::vector<std::vector<float>> predicted_scores_;
  std::vector<std::vector<int32_t>> predicted_for_accuracy_;
  int64_t predictions_ = 0, predictions_right_ = 0;

  // step scratch
  std::vector<int32_t> uniq_, uniq_count_, uniq_next_, miss_, miss_tokens_;
  std::vector<int32_t> cpu_misses_;  // keys the schedule sent to the CPU this step
  std::vector<float> uniq_weight_;
  std::vector<int32_t> key_index_;  // key -> index in uniq_ (-1 outside a step)
  std::vector<double> cand_score_;
  std::vector<int64_t> hist_sum_;
  std::vector<double> aff_prob_;
  std::vector<int32_t> cand_;
  Plan* out_ = nullptr;  // plan being written by the current step
  std::vector<int32_t> pending_releases_;  // made outside a step; reported by the next plan
  std::vector<uint8_t> miss_gpu_;
  std::vector<int32_t> marked_;  // keys with needed_ set during this step
  std::vector<int64_t> part_clock_;  // accesses seen by each partition
  std::vector<std::vector<int32_t>> freq_ring_part_;
  std::vector<int64_t> freq_ring_pos_part_;
  bool track_all_ = false;  // adapt rules may switch eviction: keep every policy's state

  // cost model state; the CPU rates' fit: exponentially weighted sums over CPU jobs of w = experts,
  // tau = tokens per expert and y = time per expert (csrc/cost_model.cpp)
  double now_us_ = 0.0, copy_free_us_ = 0.0;
  double cpu_w_ = 0.0, cpu_wt_ = 0.0, cpu_wy_ = 0.0, cpu_wtt_ = 0.0, cpu_wty_ = 0.0;
  std::vector<double> layer_predicted_us_;
  double pred_err_sum_ = 0.0;
  int64_t pred_err_n_ = 0;

  // windows for adapt rules: cumulative counters per step (ring)
  struct Cum {
    int64_t accesses, hits, evictions, prefetches, prefetch_used, cpu, fetches, tokens, bytes,
        observed_steps;
    double observed_us, simulated_us;
  };
  // Access log: the keys of the last access_log_.size() accesses (a ring, one entry per routed
  // pair), and the keys of the first ones since reset (drift's baseline).
  std::vector<int32_t> access_log_, baseline_log_;
  int64_t logged_ = 0;
  mutable std::vector<int32_t> metric_counts_, metric_touched_;  // scratch of drift and gini
  std::vector<Cum> cum_;
  int64_t cum_n_ = 0;
  std::vector<int64_t> rule_last_fire_;
  std::vector<Firing> firings_;
  int64_t firing_count_ = 0;

  Counters total_;
  std::vector<int64_t> layer_hits_, layer_accesses_;
};

// Offline replay: the whole trace through one engine, in C++ (no per-step Python). prefill: [steps]
// nonzero where the step is a prefill (null: none is).
// ids/weights: [tokens, layers, k] row-major; step_starts: [steps + 1] token offsets. With
// oracle_predictions, lookahead/learned prefetch is fed the trace's true future routing. A
// predictor's output instead (pred_ids/pred_scores, [steps, layers, depth, width] row-major, -1 =
// no id): before layer l's step of step s, layer l+d gets the width ids of [s, l, d-1].
// With host_tier (an engine with top_k 1 whose slots are host slots, as HostPool builds it), every
// expert the GPU tier copies in, prefetches or runs on the CPU is looked up in the host tier, as the
// runtime's pool does: host_tier->counters() then holds the host tier's accesses and hits.
struct ReplayResult {
  Counters counters;
  double simulated_us = 0.0;
};
struct ReplayPredictions {
  const int32_t* ids = nullptr;
  const float* scores = nullptr;
  int depth = 0, width = 0;
};
ReplayResult replay_trace(Engine& engine, const int32_t* ids, const float* weights, int64_t tokens,
                          const int64_t* step_starts, int64_t steps, bool oracle_predictions,
                          const ReplayPredictions& predictions = {}, Engine* host_tier = nullptr,
                          const uint8_t* prefill = nullptr);

}  // namespace policy
}  // namespace moerun
