#include "arena.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda_check.h"

namespace moerun {
namespace {

// Pinned table snapshots in the flush ring. A flush only waits for a snapshot's last copy when the host
// runs this many flushes ahead of the compute stream (a decode step flushes about twice per MoE layer).
constexpr size_t kSnapshots = 64;
// Changed entries at most this far apart go in one copy (the unchanged entries between them are copied
// again, harmlessly): a layer's changes are one copy, not one per entry.
constexpr int64_t kRunGap = 256;

}  // namespace

ExpertArena::ExpertArena(void* weights, int32_t* table_mirror, int64_t num_slots, int64_t slot_elems,
                         DType dtype, int device_index, int64_t num_layers, int64_t num_experts,
                         std::shared_ptr<void> owner)
    : weights_(static_cast<char*>(weights)),
      table_mirror_(table_mirror),
      num_slots_(num_slots),
      slot_elems_(slot_elems),
      dtype_(dtype),
      device_index_(device_index),
      num_layers_(num_layers),
      num_experts_(num_experts),
      table_(static_cast<size_t>(num_layers * num_experts), -1),
      owner_of_slot_(static_cast<size_t>(num_slots), {-1, -1}),
      is_dirty_(static_cast<size_t>(num_layers * num_experts), 0),
      owner_(std::move(owner)) {
#ifdef MOERUN_WITH_CUDA
  if (!on_cuda()) return;
  CudaDeviceScope scope(device_index_);
  void* p = nullptr;
  MOERUN_CUDA_CHECK(cudaHostAlloc(&p, kSnapshots * table_.size() * sizeof(int32_t), cudaHostAllocPortable));
  snapshots_ = static_cast<int32_t*>(p);
  snapshot_done_.assign(kSnapshots, nullptr);
  snapshot_used_.assign(kSnapshots, 0);
  for (void*& e : snapshot_done_) {
    cudaEvent_t ev;
    MOERUN_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    e = ev;
  }
#endif
}

ExpertArena::~ExpertArena() {
#ifdef MOERUN_WITH_CUDA
  if (!on_cuda()) return;
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device_index_);
  for (void* e : snapshot_done_) {
    if (e == nullptr) continue;
    cudaEventSynchronize(static_cast<cudaEvent_t>(e));  // its copy still reads the snapshot
    cudaEventDestroy(static_cast<cudaEvent_t>(e));
  }
  if (snapshots_ != nullptr) cudaFreeHost(snapshots_);
  cudaSetDevice(previous);
#endif
}

void ExpertArena::check_slot(int64_t slot) const {
  if (slot < 0 || slot >= num_slots_)
    throw std::out_of_range("slot " + std::to_string(slot) + " is outside the arena's " +
                            std::to_string(num_slots_) + " slots");
}

void ExpertArena::check_expert(int64_t layer, int64_t expert) const {
  if (layer < 0 || layer >= num_layers_ || expert < 0 || expert >= num_experts_)
    throw std::out_of_range("(layer " + std::to_string(layer) + ", expert " + std::to_string(expert) +
                            ") is outside [0, " + std::to_string(num_layers_) + ") x [0, " +
                            std::to_string(num_experts_) + ")");
}

void ExpertArena::set_entry(int64_t layer, int64_t expert, int32_t value) {
  const int64_t idx = layer * num_experts_ + expert;
  table_[static_cast<size_t>(idx)] = value;
  if (!on_cuda()) {  // host memory: the kernel runs on the caller's thread, after this call
    table_mirror_[idx] = value;
    return;
  }
  if (!is_dirty_[static_cast<size_t>(idx)]) {
    is_dirty_[static_cast<size_t>(idx)] = 1;
    dirty_.push_back(idx);
  }
}

void ExpertArena::stage_assign(int64_t slot, int64_t layer, int64_t expert) {
  check_slot(slot);
  check_expert(layer, expert);
  stage_evict(slot);
  const int32_t previous = lookup(layer, expert);
  if (previous >= 0) owner_of_slot_[static_cast<size_t>(previous)] = {-1, -1};
  owner_of_slot_[static_cast<size_t>(slot)] = {layer, expert};
  set_entry(layer, expert, static_cast<int32_t>(slot));
}

void ExpertArena::stage_evict(int64_t slot) {
  check_slot(slot);
  auto& occ = owner_of_slot_[static_cast<size_t>(slot)];
  if (occ.first < 0) return;
  set_entry(occ.first, occ.second, -1);
  occ = {-1, -1};
}

void ExpertArena::flush(void* stream) {
  if (dirty_.empty()) return;
#ifdef MOERUN_WITH_CUDA
  // A pinned snapshot, not the live table: the copy runs when the stream reaches it, and by then the
  // host may have changed entries again for kernels queued after it. (A pageable copy would be staged
  // by the driver, which may first wait for the stream: the host stalled behind queued kernels.)
  const size_t s = next_snapshot_;
  cudaEvent_t done = static_cast<cudaEvent_t>(snapshot_done_[s]);
  CudaDeviceScope scope(device_index_);
  if (snapshot_used_[s]) MOERUN_CUDA_CHECK(cudaEventSynchronize(done));  // normally long done
  int32_t* snap = snapshots_ + s * table_.size();
  std::sort(dirty_.begin(), dirty_.end());
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (size_t i = 0; i < dirty_.size();) {
    const int64_t lo = dirty_[i];
    int64_t hi = lo;
    while (++i < dirty_.size() && dirty_[i] - hi <= kRunGap) hi = dirty_[i];
    const size_t bytes = static_cast<size_t>(hi - lo + 1) * sizeof(int32_t);
    std::memcpy(snap + lo, table_.data() + lo, bytes);
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(table_mirror_ + lo, snap + lo, bytes, cudaMemcpyHostToDevice, st));
  }
  MOERUN_CUDA_CHECK(cudaEventRecord(done, st));
  snapshot_used_[s] = 1;
  next_snapshot_ = (s + 1) % kSnapshots;
#else
  (void)stream;
#endif
  for (int64_t idx : dirty_) is_dirty_[static_cast<size_t>(idx)] = 0;
  dirty_.clear();
}

void ExpertArena::assign(int64_t slot, int64_t layer, int64_t expert, void* stream) {
  stage_assign(slot, layer, expert);
  flush(stream);
}

void ExpertArena::evict(int64_t slot, void* stream) {
  stage_evict(slot);
  flush(stream);
}

void ExpertArena::clear(void* stream) {
  for (int64_t s = 0; s < num_slots_; ++s) stage_evict(s);
  flush(stream);
}

int32_t ExpertArena::lookup(int64_t layer, int64_t expert) const {
  check_expert(layer, expert);
  return table_[static_cast<size_t>(layer * num_experts_ + expert)];
}

std::pair<int64_t, int64_t> ExpertArena::occupant(int64_t slot) const {
  check_slot(slot);
  return owner_of_slot_[static_cast<size_t>(slot)];
}

int64_t ExpertArena::resident_count() const {
  int64_t n = 0;
  for (const auto& o : owner_of_slot_) n += o.first >= 0;
  return n;
}

void* ExpertArena::slot_ptr(int64_t slot) const {
  check_slot(slot);
  return weights_ + slot * slot_bytes();
}

}  // namespace moerun
