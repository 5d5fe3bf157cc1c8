// TransferEngine: copies experts from the HostPool into ExpertArena slots on dedicated copy streams and
// orders those copies against the compute stream with per-slot events, never a device-wide sync.
//   ready[slot]   recorded on the copy stream after the copy into the slot (the slot holds its expert);
//   release[slot] recorded on the compute stream after the last kernel that read the slot.
// A copy into a slot first waits on that slot's release event. Demand fetches are issued at once on
// their own stream; prefetches wait in a host-side queue and only a few are in flight on the GPU at a
// time, so a demand fetch never queues behind many prefetches, and queued prefetches can be cancelled.
// The engine updates the arena's slot table as it issues copies; it does not decide what to copy.
// When the host pool is a cache, a demand fetch first makes the expert host-resident (reading it from
// disk on a miss), a prefetch has it read on the pool's I/O threads and goes out once it is there; the
// expert is held in the pool until its copy completes, so the host tier never evicts bytes in flight.
// In the CPU-only build (or with a host arena) copies are memcpy and events complete at once.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <tuple>
#include <vector>

#include "arena.h"
#include "host_pool.h"

namespace moerun {

struct TransferStats {
  int64_t demand_fetches = 0, prefetches = 0, cancelled_prefetches = 0;
  int64_t demand_bytes = 0, prefetch_bytes = 0;
  int64_t timed_copies = 0;   // copies whose duration has been read back
  int64_t timed_bytes = 0;    // their bytes (not every copy is timed: bandwidth = timed_bytes / copy_time_us)
  double copy_time_us = 0;    // summed duration of those copies (GPU clock)
};

class TransferEngine {
 public:
  TransferEngine(std::shared_ptr<ExpertArena> arena, std::shared_ptr<HostPool> pool, int num_streams,
                 int max_inflight_prefetches);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  // Copies (layer, expert) into `slot` and marks it resident in the arena's table (table update ordered on
  // `compute_stream`). demand=true: issued now; false: queued as a prefetch.
  void fetch(int64_t layer, int64_t expert, int64_t slot, bool demand, void* compute_stream);
  // Makes compute_stream wait on the ready events of `slots` (queued prefetches into them are issued first).
  void wait_slots(const std::vector<int64_t>& slots, void* compute_stream);
  // Records the release event of `slots` on compute_stream (call after the kernel that read them).
  void release_slots(const std::vector<int64_t>& slots, void* compute_stream);
  // Drops queued (not yet issued) prefetches, empties their slots in the arena, returns them as
  // (layer, expert, slot) so the caller can tell the policy engine.
  std::vector<std::tuple<int64_t, int64_t, int64_t>> cancel_prefetches(void* compute_stream);
  // Issues queued prefetches while fewer than the limit are in flight; harvests copy timings.
  void poll();
  // Blocks until every issued copy has finished (tests and shutdown; not for the hot path).
  void synchronize();
  int64_t queued_prefetches() const { return static_cast<int64_t>(queue_.size()); }
  TransferStats stats();
  void reset_stats();
  int num_streams() const { return num_streams_; }
  int device_index() const { return arena_->device_index(); }

 private:
  struct Pending {
    int64_t layer, expert, slot;
  };
  // Copies the expert's held host bytes `src` into its slot; the hold ends when the copy has finished.
  void issue(const Pending& p, bool demand, const void* src);
  int64_t inflight_prefetches();

  std::shared_ptr<ExpertArena> arena_;
  std::shared_ptr<HostPool> pool_;
  int num_streams_;
  int max_inflight_;
  std::deque<Pending> queue_;
  std::vector<int64_t> queued_in_slot_;  // [N] number of queued prefetches targeting each slot
  TransferStats stats_;
  int next_prefetch_stream_ = 0;
#ifdef MOERUN_WITH_CUDA
  bool cuda_ = false;
  std::vector<void*> streams_;        // cudaStream_t; [0] demand, [1..] prefetch
  std::vector<void*> ready_;          // cudaEvent_t per slot
  std::vector<void*> release_;        // cudaEvent_t per slot
  std::vector<void*> inflight_prefetch_events_;  // ready events of issued prefetches not yet seen done
  struct Timing {
    void* start;
    void* end;
    bool busy;
    int64_t bytes;
  };
  std::vector<Timing> timings_;       // ring of timing-event pairs
  size_t timing_head_ = 0;
  std::deque<size_t> timing_busy_;    // indices in issue order
#endif
};

}  // namespace moerun
