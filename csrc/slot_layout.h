// The expert slot layout: where one routed expert's tensors sit inside its fixed-size slot. The arena,
// the host pool, the transfer engine, the CPU executor, the fused-MoE kernel and every Python caller
// take it from here (Python: moerun.native.slot_layout), so a slot is defined once.
//
// A slot holds one expert contiguously, so moving an expert is one copy. The float format:
//   gate_up [2I, H] (rows: gate then up) | down [H, I] | padding to a multiple of kSlotAlignElems
// A quantized format (expert_format.h): gate_up weights | scales | zero points | down weights | scales |
// zero points, each part 16-byte aligned, then the same padding. An expert with biases (gpt-oss) adds, in
// every format, two parts after all of these, each 16-byte aligned and in the model dtype (transformers adds
// them in the model dtype): gate_up bias [2I] (the I gate biases, then the I up biases) and down bias [H].
// Offsets and sizes are in bytes, the one unit every format shares; a part a format does not have has size 0.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "dtype.h"
#include "expert_format.h"

namespace moerun {

// Every slot size is a multiple of this many elements of the model dtype (the arena's element type), so each
// slot starts 128-byte aligned (256 for fp32) in an arena of consecutive slots.
constexpr int64_t kSlotAlignElems = 64;
// Quantized formats start each part (weights, scales, zero points) at a multiple of this many bytes, so
// kernels load them with aligned vector loads.
constexpr int64_t kPartAlignBytes = 16;

struct SlotLayout {
  DType dtype = DType::BF16;       // the model dtype: the arena's element type and the float format's weights
  ExpertFormat format;             // how the weights are encoded (expert_format.h)
  int64_t hidden_size = 0, inter_size = 0;
  int64_t gate_up_offset = 0, gate_up_bytes = 0;                // [2I, H] weights
  int64_t gate_up_scales_offset = 0, gate_up_scales_bytes = 0;  // none (0 bytes) for the float format
  int64_t gate_up_zeros_offset = 0, gate_up_zeros_bytes = 0;    // int4 only
  int64_t down_offset = 0, down_bytes = 0;                      // [H, I] weights
  int64_t down_scales_offset = 0, down_scales_bytes = 0;
  int64_t down_zeros_offset = 0, down_zeros_bytes = 0;
  bool has_bias = false;
  int64_t gate_up_bias_offset = 0, gate_up_bias_bytes = 0;  // [2I] of dtype: gate biases, then up biases
  int64_t down_bias_offset = 0, down_bias_bytes = 0;        // [H] of dtype
  int64_t slot_elems = 0;  // elements of `dtype` in one slot, padding included (the arena's row length)
  int64_t slot_bytes = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t align_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Bytes of one matrix's weights, scales and zero points in `format`. `split_rows` is the row count of each
// separately blocked part (gate_up: I, blocked as gate then up; down: H), which only fp8-block128 uses.
struct MatrixBytes {
  int64_t weights = 0, scales = 0, zeros = 0;
};
inline MatrixBytes matrix_bytes(const ExpertFormat& f, DType dtype, int64_t rows, int64_t cols, int64_t split_rows) {
  MatrixBytes m;
  switch (f.kind) {
    case FormatKind::Float: m.weights = rows * cols * dtype_bytes(dtype); break;
    case FormatKind::Fp8Channel:
    case FormatKind::Int8Channel:
      m.weights = rows * cols;
      m.scales = 4 * rows;
      break;
    case FormatKind::Fp8Block:
      m.weights = rows * cols;
      m.scales = 4 * (rows / split_rows) * ceil_div(split_rows, f.group) * ceil_div(cols, f.group);
      break;
    case FormatKind::Int4Group:
      m.weights = rows * cols / 2;
      m.scales = 4 * rows * (cols / f.group);
      m.zeros = rows * (cols / f.group);
      break;
    case FormatKind::Mxfp4:
      m.weights = rows * cols / 2;
      m.scales = rows * (cols / f.group);
      break;
  }
  return m;
}

// Throws std::invalid_argument when `format` cannot hold an expert of this shape (a group that does not
// divide the input dimension), naming the format, the dimension and what would work.
inline void check_format_shape(const ExpertFormat& f, int64_t hidden_size, int64_t inter_size) {
  if (f.kind != FormatKind::Int4Group && f.kind != FormatKind::Mxfp4) return;
  for (const int64_t dim : {hidden_size, inter_size}) {
    if (dim % f.group != 0)
      throw std::invalid_argument(std::string("expert format ") + expert_format_name(f) + " groups " +
                                  std::to_string(f.group) + " inputs, which must divide both hidden_size (" +
                                  std::to_string(hidden_size) + ") and the expert intermediate size (" +
                                  std::to_string(inter_size) + "); pick a smaller group or another format");
  }
}

inline SlotLayout slot_layout(DType dtype, int64_t hidden_size, int64_t inter_size,
                              ExpertFormat format = ExpertFormat{}, bool bias = false) {
  check_format_shape(format, hidden_size, inter_size);
  SlotLayout s;
  s.dtype = dtype;
  s.format = format;
  s.hidden_size = hidden_size;
  s.inter_size = inter_size;
  s.has_bias = bias;
  const MatrixBytes gu = matrix_bytes(format, dtype, 2 * inter_size, hidden_size, inter_size);
  const MatrixBytes dn = matrix_bytes(format, dtype, hidden_size, inter_size, hidden_size);
  // The float format packs its two matrices back to back (the layout every float kernel reads); the
  // quantized ones align each part.
  const int64_t a = format.quantized() ? kPartAlignBytes : 1;
  int64_t at = 0;
  auto place = [&](int64_t bytes, int64_t* offset, int64_t* size, int64_t align) {
    at = bytes ? align_up(at, align) : at;
    *offset = at;
    *size = bytes;
    at += bytes;
  };
  place(gu.weights, &s.gate_up_offset, &s.gate_up_bytes, a);
  place(gu.scales, &s.gate_up_scales_offset, &s.gate_up_scales_bytes, a);
  place(gu.zeros, &s.gate_up_zeros_offset, &s.gate_up_zeros_bytes, a);
  place(dn.weights, &s.down_offset, &s.down_bytes, a);
  place(dn.scales, &s.down_scales_offset, &s.down_scales_bytes, a);
  place(dn.zeros, &s.down_zeros_offset, &s.down_zeros_bytes, a);
  // Biases after everything else, so the other parts sit where they do without them.
  const int64_t b = dtype_bytes(dtype);
  place(bias ? 2 * inter_size * b : 0, &s.gate_up_bias_offset, &s.gate_up_bias_bytes, kPartAlignBytes);
  place(bias ? hidden_size * b : 0, &s.down_bias_offset, &s.down_bias_bytes, kPartAlignBytes);
  s.slot_elems = align_up(ceil_div(at, b), kSlotAlignElems);
  s.slot_bytes = s.slot_elems * b;
  return s;
}

// The parts of a slot as (offset, bytes), in placement order; parts the layout lacks have 0 bytes.
inline std::array<std::pair<int64_t, int64_t>, 8> slot_part_spans(const SlotLayout& l) {
  return {{{l.gate_up_offset, l.gate_up_bytes},
           {l.gate_up_scales_offset, l.gate_up_scales_bytes},
           {l.gate_up_zeros_offset, l.gate_up_zeros_bytes},
           {l.down_offset, l.down_bytes},
           {l.down_scales_offset, l.down_scales_bytes},
           {l.down_zeros_offset, l.down_zeros_bytes},
           {l.gate_up_bias_offset, l.gate_up_bias_bytes},
           {l.down_bias_offset, l.down_bias_bytes}}};
}

// Bytes of a slot its parts use: where the padding starts.
inline int64_t slot_used_bytes(const SlotLayout& l) {
  int64_t end = 0;
  for (const auto& [offset, bytes] : slot_part_spans(l)) end = std::max(end, offset + bytes);
  return end;
}

// Elements of one float-format slot: the layout's size in elements (the same for every float dtype).
inline int64_t slot_elems_for(int64_t hidden_size, int64_t inter_size) {
  return slot_layout(DType::BF16, hidden_size, inter_size).slot_elems;
}

}  // namespace moerun
