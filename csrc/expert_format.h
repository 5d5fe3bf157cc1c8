// Expert formats: how one routed expert's weights are encoded in its slot. This file is the one list of
// format names (Python: moerun.native.expert_formats()); slot_layout.h says where each part of a format sits.
//
// Every format stores the two matrices of an expert row-major with the output dimension first:
//   gate_up [2I, H] (the I gate rows, then the I up rows) and down [H, I],
// and, for the quantized formats, per matrix: the packed weights, then their scales, then their zero points.
// Decoding a weight w[r, c] of a matrix with R rows and C columns:
//   float        w = the element itself (the model dtype: bf16, fp16 or fp32)
//   fp8          w = e4m3fn(q[r, c]) * scale[r]                          scale fp32 [R]
//   fp8-block128 w = e4m3fn(q[r, c]) * scale[rb(r), c / 128]             scale fp32 [RB, ceil(C / 128)]
//                where gate, up and down are blocked separately (DeepSeek-V3 / Qwen3 FP8 `weight_scale_inv`):
//                gate_up's RB = 2 * ceil(I / 128), rb(r) = r / 128 for gate rows, ceil(I / 128) + (r - I) / 128 for up
//   int8         w = int8(q[r, c]) * scale[r]                            scale fp32 [R]
//   int4-gG      w = (q[r, c] - zero[r, c / G]) * scale[r, c / G]        q uint4, zero uint8 [R, C / G], scale fp32
//   mxfp4        w = e2m1(q[r, c]) * 2^(e8m0[r, c / 32] - 127)           scale uint8 [R, C / 32]
// Four-bit values are two per byte along a row: column 2j in the low nibble, 2j + 1 in the high one (the
// gpt-oss `*_blocks` order). e2m1 nibbles: bit 3 sign, then 0, .5, 1, 1.5, 2, 3, 4, 6.
// Every decode is one fp32 multiply of exactly representable operands, so the same weight decodes to the
// same fp32 value in every kernel and in the tests' reference dequantizers.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace moerun {

// The decode a format's kernels run; formats that differ only in their group size share a kind. Kernels
// branch on these codes (Python: SlotLayout.kind, moerun.native.FORMAT_KINDS).
enum class FormatKind : int32_t { Float = 0, Fp8Channel = 1, Fp8Block = 2, Int8Channel = 3, Int4Group = 4, Mxfp4 = 5 };
inline constexpr const char* kFormatKindNames[] = {"float", "fp8", "fp8-block", "int8", "int4", "mxfp4"};
inline constexpr int kNumFormatKinds = static_cast<int>(sizeof(kFormatKindNames) / sizeof(kFormatKindNames[0]));

struct ExpertFormat {
  FormatKind kind = FormatKind::Float;
  int32_t group = 0;  // fp8-block: block edge (128); int4: inputs per group; mxfp4: 32; else 0

  bool quantized() const { return kind != FormatKind::Float; }
  bool operator==(const ExpertFormat& o) const { return kind == o.kind && group == o.group; }
  bool operator!=(const ExpertFormat& o) const { return !(*this == o); }
};

// The formats, in the order moerun lists them: (name, format). The one list of names.
struct NamedFormat {
  const char* name;
  ExpertFormat format;
  const char* what;  // one line for error messages and `--help`
};
inline constexpr NamedFormat kExpertFormats[] = {
    {"float", {FormatKind::Float, 0}, "the model dtype itself (bf16, fp16 or fp32), unquantized"},
    {"fp8", {FormatKind::Fp8Channel, 0}, "float8 e4m3, one fp32 scale per output channel"},
    {"fp8-block128", {FormatKind::Fp8Block, 128}, "float8 e4m3, one fp32 scale per 128x128 block (DeepSeek-V3/Qwen3 FP8)"},
    {"int8", {FormatKind::Int8Channel, 0}, "int8 symmetric, one fp32 scale per output channel"},
    {"int4-g32", {FormatKind::Int4Group, 32}, "uint4 with fp32 scale and uint8 zero point per 32 inputs"},
    {"int4-g64", {FormatKind::Int4Group, 64}, "uint4 with fp32 scale and uint8 zero point per 64 inputs"},
    {"int4-g128", {FormatKind::Int4Group, 128}, "uint4 with fp32 scale and uint8 zero point per 128 inputs (GPTQ)"},
    {"mxfp4", {FormatKind::Mxfp4, 32}, "OCP MXFP4: e2m1 with one e8m0 scale per 32 inputs (gpt-oss)"},
};
inline constexpr int kNumExpertFormats = static_cast<int>(sizeof(kExpertFormats) / sizeof(kExpertFormats[0]));

inline std::string expert_format_names() {
  std::string s;
  for (int i = 0; i < kNumExpertFormats; ++i) s += (i ? ", " : "") + std::string(kExpertFormats[i].name);
  return s;
}

inline const char* expert_format_name(const ExpertFormat& f) {
  for (const auto& nf : kExpertFormats)
    if (nf.format == f) return nf.name;
  return "?";
}

inline ExpertFormat parse_expert_format(const std::string& name) {
  for (const auto& nf : kExpertFormats)
    if (name == nf.name) return nf.format;
  throw std::invalid_argument("unknown expert format '" + name + "': the formats are " + expert_format_names());
}

// Bits of one stored weight (scales and zero points not counted).
inline int weight_bits(const ExpertFormat& f, int float_bytes) {
  switch (f.kind) {
    case FormatKind::Float: return 8 * float_bytes;
    case FormatKind::Fp8Channel:
    case FormatKind::Fp8Block:
    case FormatKind::Int8Channel: return 8;
    case FormatKind::Int4Group:
    case FormatKind::Mxfp4: return 4;
  }
  return 0;
}

}  // namespace moerun
