// ExpertArena: the fixed set of expert slots on the compute device and the slot table that maps
// (layer, expert) to a slot. It knows nothing about where experts come from (HostPool) or how they
// are copied (TransferEngine); it only keeps the table and its device mirror consistent.
//
// The slot memory itself ([num_slots, slot_elems], one allocation) and the device mirror of the table
// ([num_layers, num_experts] int32) are allocated by the caller (the binding, through torch) and passed
// as raw pointers, so this file needs no torch headers.
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

  // Puts (layer, expert) in `slot`: the previous occupant's table entry and any other slot that held
  // (layer, expert) are cleared. The device mirror is updated on `stream` (cudaStream_t; ignored for
  // host memory), in stream order with the kernels that read it.
  void assign(int64_t slot, int64_t layer, int64_t expert, void* stream);
  // Empties `slot` (no-op when it is already free).
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
  void set_entry(int64_t layer, int64_t expert, int32_t value, void* stream);

  char* weights_;
  int32_t* table_mirror_;
  int64_t num_slots_, slot_elems_;
  DType dtype_;
  int device_index_;
  int64_t num_layers_, num_experts_;
  std::vector<int32_t> table_;                      // host copy [L * E], -1 = not resident
  std::vector<std::pair<int64_t, int64_t>> owner_of_slot_;  // [N] (layer, expert) or (-1, -1)
  std::shared_ptr<void> owner_;
};

}  // namespace moerun
