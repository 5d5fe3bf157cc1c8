// ExpertArena: the fixed set of expert slots on the compute device and the slot table that maps
// (layer, expert) to a slot. It knows nothing about where experts come from (HostPool) or how they
// are copied (TransferEngine); it only keeps the table and its device mirror consistent.
//
// The slot memory itself ([num_slots, slot_elems], one allocation) and the device mirror of the table
// ([num_layers, num_experts] int32) are allocated by the caller (the binding, through torch) and passed
// as raw pointers, so this file needs no torch headers.
//
// Table changes are staged: the host table changes at once, the device mirror at flush(), with one
// copy per run of nearby changed entries from a pinned snapshot, in stream order on the compute
// stream. A caller that changes several entries (a layer step's fetches, evictions, prefetches and
// releases) stages them all and flushes once, before the next kernel that reads the table is queued:
// kernels queued before the flush read the old table (a victim's entry until its slot is released),
// kernels queued after it the new one. With the arena in host memory the mirror is the table's own
// copy, written at once.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "dtype.h"

namespace moerun {

class ExpertArena {
 public:
  // weights: num_slots * slot_elems elements of `dtype`; table_mirror: num_layers * num_experts int32,
  // both on device `device_index` (-1 = host memory). `owner` keeps the memory alive.
  ExpertArena(void* weights, int32_t* table_mirror, int64_t num_slots, int64_t slot_elems, DType dtype,
              int device_index, int64_t num_layers, int64_t num_experts, std::shared_ptr<void> owner);
  ~ExpertArena();
  ExpertArena(const ExpertArena&) = delete;
  ExpertArena& operator=(const ExpertArena&) = delete;

  // Staged changes (see the top of this file): the device mirror follows at flush().
  // Puts (layer, expert) in `slot`: the previous occupant's table entry and any other slot that held
  // (layer, expert) are cleared.
  void stage_assign(int64_t slot, int64_t layer, int64_t expert);
  // Empties `slot` (no-op when it is already free).
  void stage_evict(int64_t slot);
  // Copies the staged changes to the device mirror on `stream` (cudaStream_t; ignored for host
  // memory), in stream order with the kernels that read it; nothing when nothing is staged.
  void flush(void* stream);
  bool staged() const { return !dirty_.empty(); }

  // One change, flushed at once.
  void assign(int64_t slot, int64_t layer, int64_t expert, void* stream);
  void evict(int64_t slot, void* stream);
  // Empties every slot.
  void clear(void* stream);
  int32_t lookup(int64_t layer, int64_t expert) const;
  // (layer, expert) held by `slot`, or (-1, -1).
  std::pair<int64_t, int64_t> occupant(int64_t slot) const;
  int64_t resident_count() const;

  void* slot_ptr(int64_t slot) const;
  int64_t num_slots() const { return num_slots_; }
  int64_t slot_elems() const { return slot_elems_; }
  int64_t slot_bytes() const { return slot_elems_ * dtype_bytes(dtype_); }
  DType dtype() const { return dtype_; }
  int device_index() const { return device_index_; }
  bool on_cuda() const { return device_index_ >= 0; }
  int64_t num_layers() const { return num_layers_; }
  int64_t num_experts() const { return num_experts_; }
  const std::shared_ptr<void>& owner() const { return owner_; }

  void check_slot(int64_t slot) const;
  void check_expert(int64_t layer, int64_t expert) const;

 private:
  void set_entry(int64_t layer, int64_t expert, int32_t value);

  char* weights_;
  int32_t* table_mirror_;
  int64_t num_slots_, slot_elems_;
  DType dtype_;
  int device_index_;
  int64_t num_layers_, num_experts_;
  std::vector<int32_t> table_;                      // host copy [L * E], -1 = not resident
  std::vector<std::pair<int64_t, int64_t>> owner_of_slot_;  // [N] (layer, expert) or (-1, -1)
  std::vector<int64_t> dirty_;                      // table indices changed since the last flush
  std::vector<uint8_t> is_dirty_;                   // [L * E] index already in dirty_
  // Pinned snapshots the flushes copy from (device arena only): a ring of kSnapshots tables; a
  // snapshot is rewritten only once the copy that read it last has run (its event).
  int32_t* snapshots_ = nullptr;                    // [kSnapshots, L * E]
  std::vector<void*> snapshot_done_;                // cudaEvent_t per snapshot, recorded after its copies
  std::vector<uint8_t> snapshot_used_;
  size_t next_snapshot_ = 0;
  std::shared_ptr<void> owner_;
};

}  // namespace moerun
