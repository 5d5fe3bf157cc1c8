// TransferEngine: copies experts from the HostPool into ExpertArena slots on dedicated copy streams and
// orders those copies against the compute stream with per-slot events, never a device-wide sync.
//   ready[slot]   recorded on the copy stream after the copy into the slot (the slot holds its expert);
//   release[slot] recorded on the compute stream after the last kernel that read the slot.
// A copy into a slot first waits on that slot's release event. Demand fetches are issued at once on
// their own stream; prefetches wait in a host-side queue and only a few are in flight on the GPU at a
// time, so a demand fetch never queues behind many prefetches, and queued prefetches can be cancelled.
// The engine updates the arena's slot table as it issues copies (each call writes the device table once,
// however many entries it changed); it does not decide what to copy.
// A layer step's copies and slot events come in two calls (begin_step before its kernel, end_step after
// it), so that a step costs the host a couple of calls, not one per expert.
// When the host pool is a cache, a demand fetch first makes the expert host-resident (reading it from
// disk on a miss), a prefetch has it read on the pool's I/O threads and goes out once it is there; the
// expert is held in the pool until its copy completes, so the host tier never evicts bytes in flight.
// In the CPU-only build (or with a host arena) copies are memcpy and events complete at once.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "arena.h"
#include "host_pool.h"

namespace moerun {

// One expert copy: (layer, expert) into `slot`; for a release, the occupant leaving `slot`.
struct SlotCopy {
  int64_t layer, expert, slot;
};

// What a layer step's plan asks of the copy engine (the policy engine's decisions, as plain lists).
struct StepCopies {
  std::vector<SlotCopy> demand;      // copied before the kernel (the step's misses that go to the GPU)
  std::vector<int64_t> read_slots;   // the slots the kernel reads (hits and demand copies)
  std::vector<SlotCopy> prefetches;  // queued after the kernel launch (for later layers, or admissions)
  std::vector<SlotCopy> releases;    // leave the table after the kernel, unless their slot changed hands
  // The prefetches are a prefill's stream of the next layer's experts: issued at once after the kernel
  // launch, on the demand stream, not queued behind the in-flight limit (the next layer waits for them all).
  bool prefetch_now = false;
  void clear() {
    demand.clear(); read_slots.clear(); prefetches.clear(); releases.clear();
    prefetch_now = false;
  }
};

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
  // fetch() of each copy in order, the table written once at the end.
  void fetch_all(const std::vector<SlotCopy>& copies, bool demand, void* compute_stream);

  // One layer step, as its plan lists it. begin_step (before the kernel launch): the demand copies, the
  // table written once, then compute_stream waits on the ready events of read_slots. The step stays open
  // until end_step (after the kernel launch): release events of read_slots recorded, prefetches queued,
  // released experts emptied from their slots (unless the slot changed hands in this step), the table
  // written once. If begin_step throws (a host-cache read failed), its copies not yet issued are issued
  // by end_step, so the table and the policy engine agree again; end_step may be called again after it
  // throws. One step is open at a time.
  void begin_step(const StepCopies& step, void* compute_stream);
  void end_step(void* compute_stream);
  bool step_open() const { return step_open_; }
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
  // No copy handed over since the last synchronize(): every expert in the table has landed.
  bool settled() const { return settled_ && unissued_.empty(); }
  int64_t queued_prefetches() const { return static_cast<int64_t>(queue_.size()); }
  TransferStats stats();
  // Duration (µs, GPU clock) and bytes of the copies timed since the last call (see TransferStats).
  std::pair<double, int64_t> take_copy_timing();
  void reset_stats();
  int num_streams() const { return num_streams_; }
  int device_index() const { return arena_->device_index(); }

 private:
  using Pending = SlotCopy;
  // Copies the expert's held host bytes `src` into its slot; the hold ends when the copy has finished.
  void issue(const Pending& p, bool demand, const void* src);
  // One copy handed over (the table entry staged; a demand copy issued, a prefetch queued); callers
  // write the table and poll once.
  void hand_over(const SlotCopy& c, bool demand);
  // hand_over() of unissued_ in order; an exception leaves the rest there for the next call.
  void drain();
  void flush_after_error(void* compute_stream) noexcept;
  void wait_slot(int64_t slot, void* compute_stream);
  void release_unscoped(const std::vector<int64_t>& slots, void* compute_stream);
  void poll_unscoped();  // poll() inside a call that holds the device scope already
  int64_t inflight_prefetches();

  std::shared_ptr<ExpertArena> arena_;
  std::shared_ptr<HostPool> pool_;
  int num_streams_;
  int max_inflight_;
  std::deque<Pending> queue_;
  std::vector<int64_t> queued_in_slot_;  // [N] number of queued prefetches targeting each slot
  TransferStats stats_;
  double taken_copy_us_ = 0;     // take_copy_timing() so far
  int64_t taken_bytes_ = 0;
  bool settled_ = true;          // nothing handed over since synchronize()
  std::deque<std::pair<SlotCopy, bool>> unissued_;  // (copy, demand) handed to a call, not yet carried out
  StepCopies step_;              // the open step (begin_step .. end_step)
  bool step_open_ = false;
  bool step_released_ = false, step_prefetches_handed_ = false;  // end_step's progress (it may be re-run)
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
