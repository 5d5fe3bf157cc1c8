// HostPool: every routed expert of the model in host memory, each in the slot layout
// (gate_up [2I, H] then down [H, I], zero padding), so moving an expert to a slot is one copy.
// Memory is pinned (page-locked, CUDA builds) and allocated in chunks: pinning many GB in one call
// fails where several smaller calls succeed. The pool is filled straight from safetensors files by
// several threads (pread into the pinned chunks, dtype converted on the fly); it knows nothing about
// checkpoint key names (the loader passes file + tensor names) or about the GPU arena.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dtype.h"

namespace moerun {

// Where one expert's three matrices live on disk. Shapes expected: gate, up [I, H]; down [H, I].
struct ExpertSource {
  int64_t layer = 0;
  int64_t expert = 0;
  std::string file[3];    // gate, up, down
  std::string tensor[3];  // tensor names inside those files
};

class HostPool {
 public:
  // Allocates num_layers * num_experts slots of slot_elems_for(hidden, inter) elements in chunks of at
  // most chunk_bytes (rounded to whole experts). pinned: page-lock through CUDA (CUDA builds only).
  HostPool(int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size, DType dtype,
           int64_t chunk_bytes, bool pinned);
  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  // Reads every source into its slot with num_threads threads (0 = hardware threads, at most 16).
  // Validates all files/tensors (presence, shape, dtype) before reading any weight bytes.
  void fill(const std::vector<ExpertSource>& sources, int num_threads);
  // Copies one expert from memory given as three row-major matrices of `src_dtype`.
  void write_expert(int64_t layer, int64_t expert, const void* gate, const void* up, const void* down,
                    DType src_dtype);

  void* expert_ptr(int64_t layer, int64_t expert) const;
  bool filled(int64_t layer, int64_t expert) const;
  int64_t filled_count() const;

  int64_t num_layers() const { return num_layers_; }
  int64_t num_experts() const { return num_experts_; }
  int64_t hidden_size() const { return hidden_; }
  int64_t inter_size() const { return inter_; }
  int64_t slot_elems() const { return slot_elems_; }
  int64_t slot_bytes() const { return slot_elems_ * dtype_bytes(dtype_); }
  int64_t total_bytes() const { return slot_bytes() * num_layers_ * num_experts_; }
  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  DType dtype() const { return dtype_; }
  bool pinned() const { return pinned_; }

 private:
  void check_expert(int64_t layer, int64_t expert) const;
  void free_chunks();

  int64_t num_layers_, num_experts_, hidden_, inter_, slot_elems_;
  DType dtype_;
  bool pinned_;
  int64_t experts_per_chunk_;
  std::vector<char*> chunks_;
  std::vector<uint8_t> filled_;  // [L * E]
};

}  // namespace moerun
