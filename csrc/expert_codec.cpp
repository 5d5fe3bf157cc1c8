#include "expert_codec.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace moerun {

const float kE2m1Values[16] = {0.f,  0.5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                               -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

namespace {

constexpr float kFp8Max = 448.f;   // largest finite e4m3fn
constexpr float kInt8Max = 127.f;  // symmetric int8: -127..127
constexpr int64_t kEncodeRows = 16;  // rows per encode task (fp8-block128: one 128-row band instead)

std::array<float, 256> make_e4m3fn_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7)
      v = std::numeric_limits<float>::quiet_NaN();
    else if (e == 0)
      v = std::ldexp(static_cast<float>(m), -9);  // subnormal: m * 2^-9
    else
      v = std::ldexp(static_cast<float>(8 + m), e - 10);  // (1 + m/8) * 2^(e-7)
    t[static_cast<size_t>(b)] = (b & 0x80) ? -v : v;
  }
  return t;
}
const std::array<float, 256> kE4m3fn = make_e4m3fn_table();

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// fp32 -> e4m3fn, round to nearest even; the callers clamp to +-448 first, so the NaN branch (what torch's
// conversion gives from 464 up) only catches NaN inputs. The arithmetic of c10's fp8e4m3fn_from_fp32_value,
// which the reference's `.to(torch.float8_e4m3fn)` runs.
uint8_t f32_to_e4m3fn(float f) {
  uint32_t b = bits_of(f);
  const uint32_t sign = b & 0x80000000u;
  b ^= sign;
  uint8_t r;
  if (b >= (1087u << 20)) {
    r = 0x7f;
  } else if (b < (121u << 23)) {  // below 2^-6, the smallest normal: adding 2^14 rounds to multiples of 2^-9
    r = static_cast<uint8_t>(bits_of(float_of(b) + float_of(141u << 23)) - (141u << 23));
  } else {
    const uint32_t odd = (b >> 20) & 1u;
    b += (static_cast<uint32_t>(7 - 127) << 23) + 0x7ffffu + odd;
    r = static_cast<uint8_t>(b >> 20);
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

// Nearest integer, ties to even (torch.round) for |v| < 2^22: adding 1.5 * 2^23 leaves a spacing of 1.
// Plain fp32 adds, which the compiler may not reassociate (no -ffast-math), so it vectorises where
// std::nearbyint would be a library call per element.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.f;
  return (v + kMagic) - kMagic;
}

inline float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

// e2m1 code of v: nearest value with ties to the even code, saturating at +-6 (the reference's thresholds).
inline uint8_t f32_to_e2m1(float v) {
  const float m = std::fabs(v);
  const int code = (m > 0.25f) + (m >= 0.75f) + (m > 1.25f) + (m >= 1.75f) + (m > 2.5f) + (m >= 3.5f) + (m > 5.f);
  return static_cast<uint8_t>(code + 8 * (v < 0.f));
}

// The mxfp4 shared exponent of a block whose largest magnitude is amax > 0: floor(log2(amax)) - 2 with log2
// in fp32, as the reference (and OCP's microxcaling code) computes it. Not the exact floor: for amax within a
// few ulps below 2^k, |k| >= 3, the fp32 log2 rounds up to k, and the block's exponent is one higher (its
// largest value encodes as 4 instead of saturating to 6). glibc's log2f and torch's agree on every such
// boundary (checked over the 250 floats nearest each power of two), so the bytes equal the reference's.
inline float mx_exponent(float amax) {
  return clampf(std::floor(std::log2(amax)) - 2.f, -127.f, 127.f);
}

void store_f32(float* p, float v) { std::memcpy(p, &v, 4); }

// One matrix being encoded: where its source rows are and where its parts go.
struct EncodeMatrix {
  const void* top;         // rows [0, split) (gate_up: gate; down: all of it)
  const void* bottom;      // rows [split, rows) (gate_up: up), or null
  int64_t rows, cols, split;
  uint8_t* weights;
  uint8_t* scales;
  uint8_t* zeros;
};

struct Encoder {
  const SlotLayout& layout;
  DType src;
  EncodeMatrix mats[2];

  // fp32 copy of row r, columns [c0, c0 + n), into out.
  void load(const EncodeMatrix& m, int64_t r, int64_t c0, int64_t n, float* out) const {
    const void* base = r < m.split ? m.top : m.bottom;
    const int64_t at = (r < m.split ? r : r - m.split) * m.cols + c0;
    switch (src) {
      case DType::F32: std::memcpy(out, static_cast<const float*>(base) + at, static_cast<size_t>(n) * 4); break;
      case DType::BF16: {
        const uint16_t* p = static_cast<const uint16_t*>(base) + at;
        for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
        break;
      }
      case DType::F16: {
        const uint16_t* p = static_cast<const uint16_t*>(base) + at;
        for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
        break;
      }
    }
  }

  void float_rows(const EncodeMatrix& m, int64_t r0, int64_t r1) const {
    const int64_t eb = dtype_bytes(layout.dtype);
    for (int64_t r = r0; r < r1; ++r) {
      const void* base = r < m.split ? m.top : m.bottom;
      const int64_t at = (r < m.split ? r : r - m.split) * m.cols;
      convert_elems(static_cast<const char*>(base) + at * dtype_bytes(src), src, m.weights + r * m.cols * eb,
                    layout.dtype, m.cols);
    }
  }

  // fp8 / int8, one scale per row: amax / limit.
  void channel_rows(const EncodeMatrix& m, int64_t r0, int64_t r1, bool fp8, std::vector<float>& row) const {
    const float limit = fp8 ? kFp8Max : kInt8Max;
    for (int64_t r = r0; r < r1; ++r) {
      load(m, r, 0, m.cols, row.data());
      float amax = 0.f;
      for (int64_t c = 0; c < m.cols; ++c) amax = std::max(amax, std::fabs(row[c]));
      const float scale = amax > 0.f ? amax / limit : 1.f;
      uint8_t* q = m.weights + r * m.cols;
      if (fp8) {
        for (int64_t c = 0; c < m.cols; ++c) q[c] = f32_to_e4m3fn(clampf(row[c] / scale, -kFp8Max, kFp8Max));
      } else {
        for (int64_t c = 0; c < m.cols; ++c)
          q[c] = static_cast<uint8_t>(static_cast<int8_t>(clampf(round_even(row[c] / scale), -kInt8Max, kInt8Max)));
      }
      store_f32(reinterpret_cast<float*>(m.scales) + r, scale);
    }
  }

  // int4, per group of G inputs: asymmetric over [min(lo, 0), max(hi, 0)], zero point rounded and clamped.
  void int4_rows(const EncodeMatrix& m, int64_t r0, int64_t r1, std::vector<float>& row) const {
    const int64_t G = layout.format.group, groups = m.cols / G;
    std::vector<uint8_t> q(static_cast<size_t>(m.cols));
    for (int64_t r = r0; r < r1; ++r) {
      load(m, r, 0, m.cols, row.data());
      for (int64_t g = 0; g < groups; ++g) {
        const float* v = row.data() + g * G;
        float lo = v[0], hi = v[0];
        for (int64_t i = 1; i < G; ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
        lo = std::min(lo, 0.f);
        hi = std::max(hi, 0.f);
        float scale = (hi - lo) / 15.f;
        if (!(scale > 0.f)) scale = 1.f;
        const float zero = clampf(round_even(-lo / scale), 0.f, 15.f);
        for (int64_t i = 0; i < G; ++i)
          q[static_cast<size_t>(g * G + i)] = static_cast<uint8_t>(clampf(round_even(v[i] / scale) + zero, 0.f, 15.f));
        store_f32(reinterpret_cast<float*>(m.scales) + r * groups + g, scale);
        m.zeros[r * groups + g] = static_cast<uint8_t>(zero);
      }
      uint8_t* out = m.weights + r * m.cols / 2;
      for (int64_t j = 0; j < m.cols / 2; ++j) out[j] = static_cast<uint8_t>(q[2 * j] | (q[2 * j + 1] << 4));
    }
  }

  // mxfp4, per 32 inputs: the shared exponent floor(log2(amax)) - 2 (OCP MX: amax / 2^exponent lands in
  // [4, 8), e2m1 saturating at 6), values to the nearest e2m1.
  void mxfp4_rows(const EncodeMatrix& m, int64_t r0, int64_t r1, std::vector<float>& row) const {
    const int64_t G = layout.format.group, groups = m.cols / G;
    std::vector<uint8_t> q(static_cast<size_t>(m.cols));
    for (int64_t r = r0; r < r1; ++r) {
      load(m, r, 0, m.cols, row.data());
      for (int64_t g = 0; g < groups; ++g) {
        const float* v = row.data() + g * G;
        float amax = 0.f;
        for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(v[i]));
        const int e = amax > 0.f ? static_cast<int>(mx_exponent(amax)) : 0;
        const float p = std::ldexp(1.f, e);
        for (int64_t i = 0; i < G; ++i) q[static_cast<size_t>(g * G + i)] = f32_to_e2m1(v[i] / p);
        m.scales[r * groups + g] = static_cast<uint8_t>(e + 127);
      }
      uint8_t* out = m.weights + r * m.cols / 2;
      for (int64_t j = 0; j < m.cols / 2; ++j) out[j] = static_cast<uint8_t>(q[2 * j] | (q[2 * j + 1] << 4));
    }
  }

  // fp8-block128, one band of up to 128 rows of one part: a scale per 128 x 128 block, amax / 448.
  void fp8_block_band(const EncodeMatrix& m, int64_t r0, int64_t r1, std::vector<float>& blk) const {
    const int64_t edge = layout.format.group, ncb = ceil_div(m.cols, edge), nrb = ceil_div(m.split, edge);
    const int64_t part = r0 / m.split, rb = (r0 % m.split) / edge;
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const int64_t c0 = cb * edge, n = std::min(edge, m.cols - c0);
      float amax = 0.f;
      for (int64_t r = r0; r < r1; ++r) {
        float* v = blk.data() + (r - r0) * edge;
        load(m, r, c0, n, v);
        for (int64_t c = 0; c < n; ++c) amax = std::max(amax, std::fabs(v[c]));
      }
      const float scale = amax > 0.f ? amax / kFp8Max : 1.f;
      for (int64_t r = r0; r < r1; ++r) {
        const float* v = blk.data() + (r - r0) * edge;
        uint8_t* q = m.weights + r * m.cols + c0;
        for (int64_t c = 0; c < n; ++c) q[c] = f32_to_e4m3fn(clampf(v[c] / scale, -kFp8Max, kFp8Max));
      }
      store_f32(reinterpret_cast<float*>(m.scales) + (part * nrb + rb) * ncb + cb, scale);
    }
  }
};

struct RowTask {
  int matrix;
  int64_t r0, r1;
};

}  // namespace

float e4m3fn_to_f32(uint8_t b) { return kE4m3fn[b]; }

SlotMatrix slot_gate_up(const SlotLayout& l, const void* slot) {
  const uint8_t* s = static_cast<const uint8_t*>(slot);
  return SlotMatrix{l.format, l.dtype, s + l.gate_up_offset,
                    l.gate_up_scales_bytes ? s + l.gate_up_scales_offset : nullptr,
                    l.gate_up_zeros_bytes ? s + l.gate_up_zeros_offset : nullptr,
                    2 * l.inter_size, l.hidden_size, l.inter_size};
}

SlotBias slot_gate_up_bias(const SlotLayout& l, const void* slot) {
  return SlotBias{l.has_bias ? static_cast<const uint8_t*>(slot) + l.gate_up_bias_offset : nullptr, l.dtype};
}

SlotBias slot_down_bias(const SlotLayout& l, const void* slot) {
  return SlotBias{l.has_bias ? static_cast<const uint8_t*>(slot) + l.down_bias_offset : nullptr, l.dtype};
}

SlotMatrix slot_down(const SlotLayout& l, const void* slot) {
  const uint8_t* s = static_cast<const uint8_t*>(slot);
  return SlotMatrix{l.format, l.dtype, s + l.down_offset,
                    l.down_scales_bytes ? s + l.down_scales_offset : nullptr,
                    l.down_zeros_bytes ? s + l.down_zeros_offset : nullptr,
                    l.hidden_size, l.inter_size, l.hidden_size};
}

void encode_expert(const SlotLayout& layout, const void* gate, const void* up, const void* down, DType src_dtype,
                   void* slot, const ParallelFor& parallel_for, const ExpertBiases& biases) {
  const int64_t H = layout.hidden_size, I = layout.inter_size;
  check_format_shape(layout.format, H, I);
  if (biases.given() != layout.has_bias) write_biases(layout, biases, slot);  // throws, before any work
  uint8_t* s = static_cast<uint8_t*>(slot);
  Encoder enc{layout, src_dtype,
              {{gate, up, 2 * I, H, I, s + layout.gate_up_offset, s + layout.gate_up_scales_offset,
                s + layout.gate_up_zeros_offset},
               {down, nullptr, H, I, H, s + layout.down_offset, s + layout.down_scales_offset,
                s + layout.down_zeros_offset}}};
  std::vector<RowTask> tasks;
  for (int mi = 0; mi < 2; ++mi) {
    const EncodeMatrix& m = enc.mats[mi];
    if (layout.format.kind == FormatKind::Fp8Block) {  // bands never straddle gate and up
      for (int64_t p0 = 0; p0 < m.rows; p0 += m.split)
        for (int64_t r = p0; r < p0 + m.split; r += layout.format.group)
          tasks.push_back({mi, r, std::min(r + layout.format.group, p0 + m.split)});
    } else {
      for (int64_t r = 0; r < m.rows; r += kEncodeRows) tasks.push_back({mi, r, std::min(r + kEncodeRows, m.rows)});
    }
  }
  run_tasks(parallel_for, static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const RowTask& t = tasks[static_cast<size_t>(i)];
    const EncodeMatrix& m = enc.mats[t.matrix];
    std::vector<float> scratch;
    switch (layout.format.kind) {
      case FormatKind::Float: enc.float_rows(m, t.r0, t.r1); break;
      case FormatKind::Fp8Channel:
      case FormatKind::Int8Channel:
        scratch.resize(static_cast<size_t>(m.cols));
        enc.channel_rows(m, t.r0, t.r1, layout.format.kind == FormatKind::Fp8Channel, scratch);
        break;
      case FormatKind::Fp8Block:
        scratch.resize(static_cast<size_t>(layout.format.group * layout.format.group));
        enc.fp8_block_band(m, t.r0, t.r1, scratch);
        break;
      case FormatKind::Int4Group:
        scratch.resize(static_cast<size_t>(m.cols));
        enc.int4_rows(m, t.r0, t.r1, scratch);
        break;
      case FormatKind::Mxfp4:
        scratch.resize(static_cast<size_t>(m.cols));
        enc.mxfp4_rows(m, t.r0, t.r1, scratch);
        break;
    }
  });
  write_biases(layout, biases, s);
  zero_slot_gaps(layout, s);  // every byte of the slot is defined
}

void write_biases(const SlotLayout& layout, const ExpertBiases& biases, void* slot) {
  if (biases.given() != layout.has_bias || (biases.given() && !(biases.gate && biases.up && biases.down)))
    throw std::invalid_argument(layout.has_bias ? "this slot layout holds biases: pass the expert's gate, up and "
                                                  "down biases"
                                                : "this slot layout holds no biases (slot_layout(..., bias=True) "
                                                  "makes one that does); the expert's biases have nowhere to go");
  if (!layout.has_bias) return;
  const int64_t I = layout.inter_size, b = dtype_bytes(layout.dtype);
  uint8_t* s = static_cast<uint8_t*>(slot);
  convert_elems(biases.gate, biases.dtype, s + layout.gate_up_bias_offset, layout.dtype, I);
  convert_elems(biases.up, biases.dtype, s + layout.gate_up_bias_offset + I * b, layout.dtype, I);
  convert_elems(biases.down, biases.dtype, s + layout.down_bias_offset, layout.dtype, layout.hidden_size);
}

void zero_slot_gaps(const SlotLayout& layout, void* slot) {
  uint8_t* s = static_cast<uint8_t*>(slot);
  auto parts = slot_part_spans(layout);
  std::sort(parts.begin(), parts.end());
  int64_t at = 0;
  for (const auto& [offset, bytes] : parts) {
    if (bytes == 0) continue;
    if (offset > at) std::memset(s + at, 0, static_cast<size_t>(offset - at));
    at = std::max(at, offset + bytes);
  }
  if (layout.slot_bytes > at) std::memset(s + at, 0, static_cast<size_t>(layout.slot_bytes - at));
}

void decode_rows(const SlotMatrix& m, int64_t r0, int64_t r1, float* out) {
  const int64_t C = m.cols;
  auto scale_at = [&](int64_t i) {
    float v;
    std::memcpy(&v, m.scales + 4 * i, 4);
    return v;
  };
  for (int64_t r = r0; r < r1; ++r) {
    float* o = out + (r - r0) * C;
    switch (m.format.kind) {
      case FormatKind::Float:
        for (int64_t c = 0; c < C; ++c) o[c] = load_as_f32(m.weights, r * C + c, m.dtype);
        break;
      case FormatKind::Fp8Channel: {
        const float s = scale_at(r);
        for (int64_t c = 0; c < C; ++c) o[c] = kE4m3fn[m.weights[r * C + c]] * s;
        break;
      }
      case FormatKind::Fp8Block:
        for (int64_t c = 0; c < C; ++c) o[c] = kE4m3fn[m.weights[r * C + c]] * fp8_block_scale(m, r, c);
        break;
      case FormatKind::Int8Channel: {
        const float s = scale_at(r);
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<float>(static_cast<int8_t>(m.weights[r * C + c])) * s;
        break;
      }
      case FormatKind::Int4Group: {
        const int64_t G = m.format.group, groups = C / G;
        for (int64_t c = 0; c < C; ++c) {
          const uint8_t b = m.weights[(r * C + c) / 2];
          const float q = static_cast<float>(c % 2 ? b >> 4 : b & 15);
          o[c] = (q - static_cast<float>(m.zeros[r * groups + c / G])) * scale_at(r * groups + c / G);
        }
        break;
      }
      case FormatKind::Mxfp4: {
        const int64_t G = m.format.group, groups = C / G;
        for (int64_t c = 0; c < C; ++c) {
          const uint8_t b = m.weights[(r * C + c) / 2];
          o[c] = kE2m1Values[c % 2 ? b >> 4 : b & 15] * e8m0_to_f32(m.scales[r * groups + c / G]);
        }
        break;
      }
    }
  }
}

}  // namespace moerun
