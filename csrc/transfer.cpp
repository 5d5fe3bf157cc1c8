#include "transfer.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>

#include "cuda_check.h"

namespace moerun {
namespace {

constexpr size_t kTimingRing = 256;  // copies whose duration can be pending read-back at once

#ifdef MOERUN_WITH_CUDA
using DeviceScope = CudaDeviceScope;

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// A host-pool hold that ends when the copy reading the expert's bytes has finished (run by CUDA on its
// callback thread after the copy, in stream order; it makes no CUDA call).
struct CopyHold {
  HostPool* pool;
  int64_t layer, expert;
};
void CUDART_CB end_copy_hold(void* arg) {
  std::unique_ptr<CopyHold> h(static_cast<CopyHold*>(arg));
  try {
    h->pool->release(h->layer, h->expert);
  } catch (...) {  // nothing can be reported from a CUDA callback; release only fails on misuse
  }
}
inline cudaEvent_t as_event(void* e) { return static_cast<cudaEvent_t>(e); }

// True when the event has completed (or was never recorded); false while it is pending.
bool event_done(void* e) {
  const cudaError_t r = cudaEventQuery(as_event(e));
  if (r == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  MOERUN_CUDA_CHECK(r);
  return true;
}
#endif

}  // namespace

TransferEngine::TransferEngine(std::shared_ptr<ExpertArena> arena, std::shared_ptr<HostPool> pool, int num_streams,
                               int max_inflight_prefetches)
    : arena_(std::move(arena)), pool_(std::move(pool)), num_streams_(num_streams),
      max_inflight_(max_inflight_prefetches) {
  if (num_streams < 2)
    throw std::invalid_argument("TransferEngine needs num_streams >= 2 (one for demand fetches, the rest for "
                                "prefetches); got " + std::to_string(num_streams));
  if (max_inflight_prefetches < 1)
    throw std::invalid_argument("max_inflight_prefetches must be >= 1; got " + std::to_string(max_inflight_prefetches));
  if (arena_->dtype() != pool_->dtype() || arena_->slot_elems() != pool_->slot_elems())
    throw std::invalid_argument(std::string("arena and pool disagree on the slot layout: arena ") +
                                dtype_name(arena_->dtype()) + " x " + std::to_string(arena_->slot_elems()) +
                                " elements, pool " + dtype_name(pool_->dtype()) + " x " +
                                std::to_string(pool_->slot_elems()));
  if (arena_->num_layers() != pool_->num_layers() || arena_->num_experts() != pool_->num_experts())
    throw std::invalid_argument("arena and pool disagree on the number of layers/experts");
  queued_in_slot_.assign(static_cast<size_t>(arena_->num_slots()), 0);
#ifdef MOERUN_WITH_CUDA
  cuda_ = arena_->on_cuda();
  if (!cuda_) return;
  DeviceScope scope(arena_->device_index());
  int least = 0, greatest = 0;
  MOERUN_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  for (int i = 0; i < num_streams; ++i) {
    cudaStream_t s;
    MOERUN_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, i == 0 ? greatest : least));
    streams_.push_back(s);
  }
  for (int64_t i = 0; i < arena_->num_slots(); ++i) {
    cudaEvent_t a, b;
    MOERUN_CUDA_CHECK(cudaEventCreateWithFlags(&a, cudaEventDisableTiming));
    MOERUN_CUDA_CHECK(cudaEventCreateWithFlags(&b, cudaEventDisableTiming));
    ready_.push_back(a);
    release_.push_back(b);
  }
  for (size_t i = 0; i < kTimingRing; ++i) {
    cudaEvent_t a, b;
    MOERUN_CUDA_CHECK(cudaEventCreate(&a));
    MOERUN_CUDA_CHECK(cudaEventCreate(&b));
    timings_.push_back({a, b, false, 0});
  }
#endif
}

TransferEngine::~TransferEngine() {
#ifdef MOERUN_WITH_CUDA
  if (!cuda_) return;
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(arena_->device_index());
  for (void* s : streams_) {
    cudaStreamSynchronize(as_stream(s));
    cudaStreamDestroy(as_stream(s));
  }
  for (void* e : ready_) cudaEventDestroy(as_event(e));
  for (void* e : release_) cudaEventDestroy(as_event(e));
  for (auto& t : timings_) {
    cudaEventDestroy(as_event(t.start));
    cudaEventDestroy(as_event(t.end));
  }
  cudaSetDevice(previous);
#endif
}

void TransferEngine::issue(const Pending& p, bool demand, const void* src) {
  void* dst = arena_->slot_ptr(p.slot);
  const int64_t bytes = arena_->slot_bytes();
  if (demand) {
    ++stats_.demand_fetches;
    stats_.demand_bytes += bytes;
  } else {
    ++stats_.prefetches;
    stats_.prefetch_bytes += bytes;
  }
#ifdef MOERUN_WITH_CUDA
  if (cuda_) {
    cudaStream_t s = as_stream(demand ? streams_[0]
                                      : streams_[1 + (next_prefetch_stream_++ % (num_streams_ - 1))]);
    MOERUN_CUDA_CHECK(cudaStreamWaitEvent(s, as_event(release_[static_cast<size_t>(p.slot)]), 0));
    Timing* t = nullptr;
    if (!timings_[timing_head_].busy) {
      t = &timings_[timing_head_];
      t->busy = true;
      t->bytes = bytes;
      timing_busy_.push_back(timing_head_);
      timing_head_ = (timing_head_ + 1) % kTimingRing;
      MOERUN_CUDA_CHECK(cudaEventRecord(as_event(t->start), s));
    }
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, s));
    if (t) MOERUN_CUDA_CHECK(cudaEventRecord(as_event(t->end), s));
    if (pool_->cached())
      MOERUN_CUDA_CHECK(cudaLaunchHostFunc(s, end_copy_hold, new CopyHold{pool_.get(), p.layer, p.expert}));
    void* ready = ready_[static_cast<size_t>(p.slot)];
    MOERUN_CUDA_CHECK(cudaEventRecord(as_event(ready), s));
    if (!demand) inflight_prefetch_events_.push_back(ready);
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(bytes));
  pool_->release(p.layer, p.expert);
}

void TransferEngine::hand_over(const SlotCopy& c, bool demand) {
  arena_->check_slot(c.slot);
  arena_->check_expert(c.layer, c.expert);
  const size_t slot = static_cast<size_t>(c.slot);
  // A newer request for a slot supersedes queued prefetches into it.
  if (queued_in_slot_[slot] > 0) {
    queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [&](const Pending& q) { return q.slot == c.slot; }),
                 queue_.end());
    queued_in_slot_[slot] = 0;
  }
  arena_->stage_assign(c.slot, c.layer, c.expert);
  settled_ = false;
  if (demand) {
    // A host-cache miss is read from disk here, before the copy (the step needs it now).
    issue(c, true, pool_->acquire(c.layer, c.expert));
  } else {
    queue_.push_back(c);
    ++queued_in_slot_[slot];
    pool_->prefetch(c.layer, c.expert);  // a host-cache miss is read on the pool's I/O threads meanwhile
  }
}

void TransferEngine::drain() {
  while (!unissued_.empty()) {
    const auto [copy, demand] = unissued_.front();
    hand_over(copy, demand);
    unissued_.pop_front();
  }
}

void TransferEngine::flush_after_error(void* compute_stream) noexcept {
  try {
    arena_->flush(compute_stream);  // what was staged before the error reaches the device table
  } catch (...) {                   // the error being thrown says more than this one
  }
}

void TransferEngine::fetch(int64_t layer, int64_t expert, int64_t slot, bool demand, void* compute_stream) {
  fetch_all({SlotCopy{layer, expert, slot}}, demand, compute_stream);
}

void TransferEngine::fetch_all(const std::vector<SlotCopy>& copies, bool demand, void* compute_stream) {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  // Queued first, so that copies an exception stops are carried out by the next call.
  for (const SlotCopy& c : copies) unissued_.emplace_back(c, demand);
  try {
    drain();
  } catch (...) {
    flush_after_error(compute_stream);
    throw;
  }
  arena_->flush(compute_stream);
  poll_unscoped();
}

void TransferEngine::begin_step(const StepCopies& step, void* compute_stream) {
  if (step_open_)
    throw std::logic_error("moerun internal error: TransferEngine.begin_step while the previous step is open "
                           "(end_step closes it)");
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  step_ = step;  // reuses the vectors' room: no allocation once warm
  step_open_ = true;
  step_released_ = step_prefetches_handed_ = false;
  poll_unscoped();  // prefetches queued behind the in-flight limit go out first
  try {
    for (const SlotCopy& c : step_.demand) unissued_.emplace_back(c, true);
    drain();
    for (int64_t slot : step_.read_slots) wait_slot(slot, compute_stream);
  } catch (...) {
    flush_after_error(compute_stream);
    throw;
  }
  arena_->flush(compute_stream);
}

void TransferEngine::end_step(void* compute_stream) {
  if (!step_open_) return;
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  try {
    drain();  // demand copies an exception in begin_step left behind
    if (!step_released_) {
      release_unscoped(step_.read_slots, compute_stream);
      step_released_ = true;
    }
    // Prefetches go out after the kernel launch: one may bring in an expert that the step ran on the
    // CPU, and the kernel must not also see it in the table.
    if (!step_prefetches_handed_) {
      for (const SlotCopy& c : step_.prefetches) unissued_.emplace_back(c, step_.prefetch_now);
      step_prefetches_handed_ = true;
    }
    drain();
    // Released experts leave after the kernel, unless this plan already gave their slot to another.
    for (const SlotCopy& r : step_.releases)
      if (arena_->occupant(r.slot) == std::make_pair(r.layer, r.expert)) arena_->stage_evict(r.slot);
  } catch (...) {
    flush_after_error(compute_stream);
    throw;
  }
  arena_->flush(compute_stream);
  poll_unscoped();
  step_open_ = false;
}

void TransferEngine::wait_slot(int64_t slot, void* compute_stream) {
  arena_->check_slot(slot);
  if (queued_in_slot_[static_cast<size_t>(slot)] > 0) {
    // Needed now: the queued prefetch becomes a demand copy (issued at once on the demand stream).
    auto it = std::find_if(queue_.begin(), queue_.end(), [&](const Pending& q) { return q.slot == slot; });
    Pending p = *it;
    queue_.erase(it);
    queued_in_slot_[static_cast<size_t>(slot)] = 0;
    issue(p, true, pool_->acquire(p.layer, p.expert));
  }
#ifdef MOERUN_WITH_CUDA
  if (cuda_)
    MOERUN_CUDA_CHECK(cudaStreamWaitEvent(as_stream(compute_stream), as_event(ready_[static_cast<size_t>(slot)]), 0));
#endif
  (void)compute_stream;
}

void TransferEngine::wait_slots(const std::vector<int64_t>& slots, void* compute_stream) {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  for (int64_t slot : slots) wait_slot(slot, compute_stream);
}

void TransferEngine::release_unscoped(const std::vector<int64_t>& slots, void* compute_stream) {
  for (int64_t slot : slots) arena_->check_slot(slot);
#ifdef MOERUN_WITH_CUDA
  if (!cuda_) return;
  for (int64_t slot : slots)
    MOERUN_CUDA_CHECK(cudaEventRecord(as_event(release_[static_cast<size_t>(slot)]), as_stream(compute_stream)));
#else
  (void)compute_stream;
#endif
}

void TransferEngine::release_slots(const std::vector<int64_t>& slots, void* compute_stream) {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  release_unscoped(slots, compute_stream);
}

std::vector<std::tuple<int64_t, int64_t, int64_t>> TransferEngine::cancel_prefetches(void* compute_stream) {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  drain();  // copies handed over before an error are queued (or issued) like the others
  std::vector<std::tuple<int64_t, int64_t, int64_t>> cancelled;
  for (const Pending& p : queue_) {
    if (arena_->occupant(p.slot) == std::make_pair(p.layer, p.expert)) arena_->stage_evict(p.slot);
    cancelled.emplace_back(p.layer, p.expert, p.slot);
    queued_in_slot_[static_cast<size_t>(p.slot)] = 0;
  }
  stats_.cancelled_prefetches += static_cast<int64_t>(queue_.size());
  queue_.clear();
  arena_->flush(compute_stream);
  return cancelled;
}

int64_t TransferEngine::inflight_prefetches() {
#ifdef MOERUN_WITH_CUDA
  if (cuda_) {
    auto& v = inflight_prefetch_events_;
    v.erase(std::remove_if(v.begin(), v.end(), [](void* e) { return event_done(e); }), v.end());
    return static_cast<int64_t>(v.size());
  }
#endif
  return 0;
}

void TransferEngine::poll() {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  poll_unscoped();
}

void TransferEngine::poll_unscoped() {
  // In queue order, those whose bytes are in host memory (a host-cache miss waits for its read).
  for (auto it = queue_.begin(); it != queue_.end() && inflight_prefetches() < max_inflight_;) {
    const void* src = pool_->try_acquire(it->layer, it->expert);
    if (src == nullptr) {
      ++it;
      continue;
    }
    const Pending p = *it;
    it = queue_.erase(it);
    --queued_in_slot_[static_cast<size_t>(p.slot)];
    issue(p, false, src);
  }
#ifdef MOERUN_WITH_CUDA
  while (!timing_busy_.empty()) {
    Timing& t = timings_[timing_busy_.front()];
    if (!event_done(t.end)) break;
    float ms = 0.f;
    MOERUN_CUDA_CHECK(cudaEventElapsedTime(&ms, as_event(t.start), as_event(t.end)));
    stats_.copy_time_us += 1000.0 * ms;
    stats_.timed_bytes += t.bytes;
    ++stats_.timed_copies;
    t.busy = false;
    timing_busy_.pop_front();
  }
#endif
}

void TransferEngine::synchronize() {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  // Everything still queued goes out now, waiting for host-cache reads where needed.
  drain();
  while (!queue_.empty()) {
    const Pending p = queue_.front();
    queue_.pop_front();
    --queued_in_slot_[static_cast<size_t>(p.slot)];
    issue(p, false, pool_->acquire(p.layer, p.expert));
  }
#ifdef MOERUN_WITH_CUDA
  if (cuda_)
    for (void* s : streams_) MOERUN_CUDA_CHECK(cudaStreamSynchronize(as_stream(s)));
#endif
  poll_unscoped();
  settled_ = true;
}

TransferStats TransferEngine::stats() {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  poll_unscoped();
  return stats_;
}

std::pair<double, int64_t> TransferEngine::take_copy_timing() {
#ifdef MOERUN_WITH_CUDA
  std::optional<DeviceScope> scope;
  if (cuda_) scope.emplace(arena_->device_index());
#endif
  poll_unscoped();
  const std::pair<double, int64_t> since(stats_.copy_time_us - taken_copy_us_, stats_.timed_bytes - taken_bytes_);
  taken_copy_us_ = stats_.copy_time_us;
  taken_bytes_ = stats_.timed_bytes;
  return since;
}

void TransferEngine::reset_stats() {
  stats_ = TransferStats{};
  taken_copy_us_ = 0;
  taken_bytes_ = 0;
}

}  // namespace moerun
