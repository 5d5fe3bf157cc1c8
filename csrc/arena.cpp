#include "arena.h"

#include <stdexcept>
#include <string>

#include "cuda_check.h"

namespace moerun {

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
      owner_(std::move(owner)) {}

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

void ExpertArena::set_entry(int64_t layer, int64_t expert, int32_t value, void* stream) {
  const int64_t idx = layer * num_experts_ + expert;
  table_[static_cast<size_t>(idx)] = value;
#ifdef MOERUN_WITH_CUDA
  if (on_cuda()) {
    // From pageable memory: the runtime stages the 4 bytes before returning, so `value` may die; the
    // copy runs in `stream` order, after kernels that still read the old entry.
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(table_mirror_ + idx, &value, sizeof(int32_t), cudaMemcpyHostToDevice,
                                      static_cast<cudaStream_t>(stream)));
    return;
  }
#endif
  (void)stream;
  table_mirror_[idx] = value;
}

void ExpertArena::assign(int64_t slot, int64_t layer, int64_t expert, void* stream) {
  check_slot(slot);
  check_expert(layer, expert);
  evict(slot, stream);
  const int32_t previous = lookup(layer, expert);
  if (previous >= 0) owner_of_slot_[static_cast<size_t>(previous)] = {-1, -1};
  owner_of_slot_[static_cast<size_t>(slot)] = {layer, expert};
  set_entry(layer, expert, static_cast<int32_t>(slot), stream);
}

void ExpertArena::evict(int64_t slot, void* stream) {
  check_slot(slot);
  auto& occ = owner_of_slot_[static_cast<size_t>(slot)];
  if (occ.first < 0) return;
  set_entry(occ.first, occ.second, -1, stream);
  occ = {-1, -1};
}

void ExpertArena::clear(void* stream) {
  for (int64_t s = 0; s < num_slots_; ++s) evict(s, stream);
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
