// HostPool: routed experts in host memory, each in the slot layout of the pool's expert format
// (slot_layout.h), so moving an expert to a GPU slot is one copy. Memory is pinned (page-locked, CUDA
// builds) and allocated in chunks: pinning many GB in one call fails where several smaller calls
// succeed. Experts come straight from safetensors files (ExpertFiles: pread, dtype converted on the fly);
// the pool knows nothing about checkpoint key names (the loader passes file + tensor names) or the arena.
//
// Two tiers (as in the two-level GPU/RAM/disk expert cache studied for gpt-oss): with capacity >= the model's experts the pool holds every expert, filled at load.
// With a smaller capacity it is a cache in front of the files: a host slot table (owned by a
// policy::Engine, so the host tier evicts with the same code and policies as the GPU tier: lru, lfu,
// score, freq_threshold, watermark with its watermarks), a miss reads the expert from its files into
// the slot the policy frees. Users of an expert's bytes hold it (acquire ... release): a held expert is
// never evicted. Copies to the GPU release when the copy completes, CPU jobs when they end.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dtype.h"
#include "slot_layout.h"
#include "expert_codec.h"
#include "expert_files.h"

namespace moerun {

namespace policy {
class Engine;
struct Plan;
}  // namespace policy

struct HostTierConfig {
  int64_t capacity = 0;           // experts in host memory; 0 (or >= all experts) = every expert, no disk tier
  int eviction = 0;               // policy::Eviction of the host tier (belady needs the future: refused)
  double high_watermark = 0.9, low_watermark = 0.7, credit_decay = 0.95;  // eviction = watermark
  double wait_timeout_s = 60.0;   // longest a miss waits for a slot while every slot is held
};

namespace policy {
struct EngineConfig;
}
// The policy-engine config of a host tier of `capacity` experts (top_k 1: the tier sees one expert at a
// time); HostPool runs one, and trace replay runs one behind the GPU tier to report host hit rates.
policy::EngineConfig host_tier_config(int64_t num_layers, int64_t num_experts, int64_t expert_bytes,
                                      const HostTierConfig& tier);

struct HostStats {
  int64_t hits = 0, misses = 0;   // acquires that found the expert in host memory / read it from disk
  int64_t disk_bytes = 0, evictions = 0, slot_waits = 0, prefetch_reads = 0;
  double disk_time_us = 0;        // wall time of the disk reads (summed over reading threads)
};

class HostPool {
 public:
  // Allocates min(capacity, num_layers * num_experts) slots of slot_layout(dtype, hidden, inter, format, bias)
  // in chunks of at most chunk_bytes (rounded to whole experts). pinned: page-lock through CUDA (CUDA builds).
  HostPool(int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size, DType dtype,
           int64_t chunk_bytes, bool pinned, const HostTierConfig& tier = HostTierConfig{},
           ExpertFormat format = ExpertFormat{}, bool bias = false);
  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  // Records the sources (all validated before any weight byte is read). A pool holding every expert
  // reads them now with num_threads threads (0 = hardware threads, at most 16); a cache reads on demand.
  void fill(const std::vector<ExpertSource>& sources, int num_threads);
  // Copies one expert from memory given as three row-major matrices of `src_dtype` (and its biases when the
  // layout has them), encoded into the pool's format (pools holding every expert only: a cache reads its
  // experts from the files).
  void write_expert(int64_t layer, int64_t expert, const void* gate, const void* up, const void* down,
                    DType src_dtype, const ExpertBiases& biases = {});

  // The expert's bytes, held in host memory until release(); a cache reads a missing expert from its
  // files first (waiting, at most wait_timeout_s, when every slot is held by other users).
  const void* acquire(int64_t layer, int64_t expert);
  void release(int64_t layer, int64_t expert);
  // Non-blocking acquire: the held bytes when the expert is in host memory and readable, else nullptr
  // after starting a background read (as prefetch()).
  const void* try_acquire(int64_t layer, int64_t expert);
  // Starts reading the expert into host memory on an I/O thread (no-op when present or queued).
  void prefetch(int64_t layer, int64_t expert);

  // Bytes of an expert in host memory (a cache throws when it is absent; acquire() holds, this does not).
  void* expert_ptr(int64_t layer, int64_t expert) const;
  bool filled(int64_t layer, int64_t expert) const;  // in host memory and readable
  int64_t filled_count() const;
  int64_t host_slot(int64_t layer, int64_t expert) const;  // -1 when not in host memory

  bool cached() const { return cached_; }
  int64_t capacity() const { return num_slots_; }
  HostStats stats() const;
  void reset_stats();

  int64_t num_layers() const { return num_layers_; }
  int64_t num_experts() const { return num_experts_; }
  int64_t hidden_size() const { return hidden_; }
  int64_t inter_size() const { return inter_; }
  int64_t slot_elems() const { return layout_.slot_elems; }
  int64_t slot_bytes() const { return layout_.slot_bytes; }
  const SlotLayout& layout() const { return layout_; }
  int64_t total_bytes() const { return slot_bytes() * num_slots_; }
  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  DType dtype() const { return dtype_; }
  bool pinned() const { return pinned_; }

 private:
  void check_expert(int64_t layer, int64_t expert) const;
  void free_chunks();
  char* slot_ptr(int64_t slot) const;
  int64_t read_into(int64_t layer, int64_t expert, int64_t slot);  // disk -> slot, counts disk stats
  void io_loop();

  int64_t num_layers_, num_experts_, hidden_, inter_;
  DType dtype_;
  SlotLayout layout_;
  bool pinned_;
  bool cached_;
  int64_t num_slots_;
  int64_t experts_per_chunk_;
  std::vector<char*> chunks_;
  int64_t chunk_size(int64_t c) const;  // bytes of chunk c (the last one may hold fewer experts)
  std::vector<uint8_t> chunk_alloc_;  // per chunk: mapped (+ registered when pinned_) or cudaHostAlloc'ed
  ExpertFiles files_;
  double wait_timeout_s_;

  // Full pool: filled_[key]. Cache: the tier engine's slot table plus per-key read state.
  std::vector<uint8_t> filled_;   // [L * E] full pool: read; cache: slot holds the expert's bytes
  std::vector<uint8_t> loading_;  // [L * E] cache: a thread is reading the expert into its slot
  std::vector<uint8_t> queued_;   // [L * E] cache: waiting for an I/O thread
  std::unique_ptr<policy::Engine> tier_;
  std::unique_ptr<policy::Plan> plan_;
  mutable std::mutex mu_;
  std::condition_variable cv_;    // a read finished or a hold was released
  HostStats stats_;
  std::atomic<int64_t> full_hits_{0};

  // Background reads (prefetches), started on first use.
  std::deque<int64_t> io_queue_;  // keys
  std::condition_variable io_cv_;
  std::vector<std::thread> io_threads_;
  bool io_stop_ = false;
};

}  // namespace moerun
