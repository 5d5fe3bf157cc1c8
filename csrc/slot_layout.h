// The expert slot layout: where one routed expert's tensors sit inside its fixed-size slot. The arena,
// the host pool, the transfer engine, the CPU executor, the fused-MoE kernel and every Python caller
// take it from here (Python: moerun.native.slot_layout), so a slot is defined once.
//
// A slot holds one expert contiguously, so moving an expert is one copy:
//   gate_up [2I, H] (rows: gate then up) | down [H, I] | padding to a multiple of kSlotAlignElems
// Offsets and sizes are in bytes, the one unit every format shares. The scale fields say where a
// quantized format's scales go (after their weights); the float formats have none (size 0).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace moerun {

// Every slot size is a multiple of this many elements, so each slot of a 2-byte dtype starts 128-byte
// aligned in an arena of consecutive slots.
constexpr int64_t kSlotAlignElems = 64;

struct SlotLayout {
  DType dtype = DType::BF16;       // element type of the slot's weights
  int64_t hidden_size = 0, inter_size = 0;
  int64_t gate_up_offset = 0, gate_up_bytes = 0;                // [2I, H]
  int64_t gate_up_scales_offset = 0, gate_up_scales_bytes = 0;  // none for float formats
  int64_t down_offset = 0, down_bytes = 0;                      // [H, I]
  int64_t down_scales_offset = 0, down_scales_bytes = 0;        // none for float formats
  int64_t slot_elems = 0;  // elements of `dtype` in one slot, padding included
  int64_t slot_bytes = 0;
};

inline SlotLayout slot_layout(DType dtype, int64_t hidden_size, int64_t inter_size) {
  SlotLayout s;
  const int64_t b = dtype_bytes(dtype);
  s.dtype = dtype;
  s.hidden_size = hidden_size;
  s.inter_size = inter_size;
  s.gate_up_offset = 0;
  s.gate_up_bytes = 2 * inter_size * hidden_size * b;
  s.gate_up_scales_offset = s.gate_up_offset + s.gate_up_bytes;
  s.down_offset = s.gate_up_scales_offset + s.gate_up_scales_bytes;
  s.down_bytes = hidden_size * inter_size * b;
  s.down_scales_offset = s.down_offset + s.down_bytes;
  const int64_t used = (s.down_scales_offset + s.down_scales_bytes) / b;
  s.slot_elems = (used + kSlotAlignElems - 1) / kSlotAlignElems * kSlotAlignElems;
  s.slot_bytes = s.slot_elems * b;
  return s;
}

// Elements of one slot: the layout's size in elements (the same for every float dtype).
inline int64_t slot_elems_for(int64_t hidden_size, int64_t inter_size) {
  return slot_layout(DType::BF16, hidden_size, inter_size).slot_elems;
}

}  // namespace moerun
