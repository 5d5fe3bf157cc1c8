// The expert codec: an expert's three matrices -> the bytes of its slot in any expert format, and a
// slot's matrices -> fp32 rows. expert_format.h defines what each format's bytes mean and slot_layout.h
// where each part sits; this file does the arithmetic. Encoding is how a float checkpoint is quantized at
// load (the algorithms of tests/expert_format_reference.py's encode_matrix, to the bit); decoding rows is
// what the CPU kernels' portable path runs and what the tests compare with the reference decoder.
// It knows nothing about pools, arenas or threads beyond the ParallelFor its caller lends it.
#pragma once
#include <cstdint>
#include <cstring>

#include "dtype.h"
#include "expert_format.h"
#include "parallel_for.h"
#include "slot_layout.h"

namespace moerun {

// One matrix of a slot as the kernels read it: `rows` x `cols` weights in `format`, output dimension first.
struct SlotMatrix {
  ExpertFormat format;
  DType dtype = DType::BF16;        // the float format's element type (the model dtype)
  const uint8_t* weights = nullptr;  // row-major; 4-bit formats: two per byte, column 2j in the low nibble
  const uint8_t* scales = nullptr;   // fp32 (fp8, fp8-block128, int8, int4) or e8m0 bytes (mxfp4); null for float
  const uint8_t* zeros = nullptr;    // int4: uint8 [rows, cols / group]; else null
  int64_t rows = 0, cols = 0;
  int64_t split_rows = 0;  // rows of each separately blocked part (fp8-block128: gate_up I, down H)
};

// The slot's gate_up [2I, H] and down [H, I] matrices.
SlotMatrix slot_gate_up(const SlotLayout& layout, const void* slot);
SlotMatrix slot_down(const SlotLayout& layout, const void* slot);

// One bias vector of a slot read as fp32: gate_up's [2I] (gate i at i, up i at I + i) or down's [H]; a layout
// without biases reads zeros, so the kernels add a bias unconditionally.
struct SlotBias {
  const uint8_t* values = nullptr;  // of dtype, or null
  DType dtype = DType::F32;
  float operator[](int64_t i) const { return values ? load_as_f32(values, i, dtype) : 0.f; }
};
SlotBias slot_gate_up_bias(const SlotLayout& layout, const void* slot);
SlotBias slot_down_bias(const SlotLayout& layout, const void* slot);

// An expert's biases as its source holds them: gate, up [I] and down [H], each of `dtype` (all null: none).
struct ExpertBiases {
  const void* gate = nullptr;
  const void* up = nullptr;
  const void* down = nullptr;
  DType dtype = DType::F32;
  bool given() const { return gate || up || down; }
};

// gate, up [I, H] and down [H, I], row-major of src_dtype -> one slot of layout.format, every byte of it
// written (zeros between parts and in the padding); the biases converted to layout.dtype when the layout has
// them. Throws std::invalid_argument for a shape the format cannot hold, or biases the layout does not have
// (or lacks). Tasks are blocks of rows (fp8-block128: a 128-row band of one part), run by parallel_for.
void encode_expert(const SlotLayout& layout, const void* gate, const void* up, const void* down, DType src_dtype,
                   void* slot, const ParallelFor& parallel_for = {}, const ExpertBiases& biases = {});

// Writes the slot's biases (layout.has_bias) from `biases`, converted to layout.dtype.
void write_biases(const SlotLayout& layout, const ExpertBiases& biases, void* slot);
// Zeros every byte of the slot outside its parts (alignment gaps and the padding).
void zero_slot_gaps(const SlotLayout& layout, void* slot);

// out[r - r0, c] = the fp32 weight (r, c) of m for r in [r0, r1): the formats' decode, exactly (one fp32
// multiply of exact operands), so it equals the reference decoder bit for bit.
void decode_rows(const SlotMatrix& m, int64_t r0, int64_t r1, float* out);

// -- the codes, for the kernels' own vector decoders ----------------------------------------------------------
// fp32 value of a float8 e4m3fn byte (NaN for 0x7f and 0xff: e4m3fn has no infinities).
float e4m3fn_to_f32(uint8_t b);
// fp32 value of an e2m1 nibble: bit 3 the sign, then 0, .5, 1, 1.5, 2, 3, 4, 6.
extern const float kE2m1Values[16];
// 2^(e - 127) as fp32, exactly: e8m0 byte 0 is 2^-127 (subnormal), 255 decodes as +inf (the reference's
// exp2(128); no encoder writes it).
inline float e8m0_to_f32(uint8_t e) {
  const uint32_t bits = e == 0 ? 0x00400000u : e == 255 ? 0x7f800000u : static_cast<uint32_t>(e) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// fp8-block128: the scale of weight (r, c), from the part-major [parts, ceil(split/128), ceil(cols/128)] grid.
inline float fp8_block_scale(const SlotMatrix& m, int64_t r, int64_t c) {
  const int64_t edge = m.format.group, nrb = ceil_div(m.split_rows, edge), ncb = ceil_div(m.cols, edge);
  const int64_t part = r / m.split_rows, rb = (r % m.split_rows) / edge;
  float s;
  std::memcpy(&s, m.scales + 4 * ((part * nrb + rb) * ncb + c / edge), 4);
  return s;
}

}  // namespace moerun
