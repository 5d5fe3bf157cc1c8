#include "cpu_kernels.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define MOERUN_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
// AMX intrinsics need GCC >= 11 or clang >= 12; older compilers build without the AMX path.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define MOERUN_AMX 1
#endif
#endif

namespace moerun {

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Scalar: return "scalar";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx512Bf16: return "avx512_bf16";
    case CpuIsa::AmxBf16: return "amx_bf16";
  }
  return "?";
}

CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::Scalar;
#ifdef MOERUN_X86
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
    unsigned long long xcr0 = 0;
    if (osxsave) {
      unsigned lo, hi;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
    }
    const bool os_avx = (xcr0 & 0x6) == 0x6;           // XMM + YMM state saved by the OS
    const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // + opmask, ZMM_Hi256, Hi16_ZMM
    unsigned a7, b7, c7, d7;
    if (__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) {
      if (os_avx && fma && f16c && (b7 & (1u << 5))) best = CpuIsa::Avx2;
      if (os_avx512 && (b7 & (1u << 16))) best = CpuIsa::Avx512;
      unsigned a71, b71, c71, d71;
      if (best == CpuIsa::Avx512 && __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71) && (a71 & (1u << 5)))
        best = CpuIsa::Avx512Bf16;
#ifdef MOERUN_AMX
      // AMX-BF16 (edx bit 22) + AMX-TILE (bit 24), tile state enabled by the OS (XCR0 bits 17, 18), and
      // Linux's permission for this process to use the 8 KB tile data state (refused on old kernels).
      const bool amx = (d7 & (1u << 22)) && (d7 & (1u << 24)) && (xcr0 & (3ull << 17)) == (3ull << 17);
      constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
      if (best == CpuIsa::Avx512Bf16 && amx && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0)
        best = CpuIsa::AmxBf16;
#endif
    }
  }
#endif
  if (const char* cap = std::getenv("MOERUN_CPU_ISA")) {
    for (int i = 0; i <= static_cast<int>(best); ++i)
      if (std::string(cap) == cpu_isa_name(static_cast<CpuIsa>(i))) return static_cast<CpuIsa>(i);
  }
  return best;
}

namespace {

// Portable path: the compiler vectorises the inner loop for the build's baseline ISA.
template <int T>
void rows_scalar(const void* W, DType wd, int64_t cols, int64_t r0, int64_t r1, const float* X, int64_t ldx,
                 float* Y, int64_t ldy) {
  std::vector<float> wrow(static_cast<size_t>(cols));
  for (int64_t r = r0; r < r1; ++r) {
    if (wd == DType::F32) {
      std::memcpy(wrow.data(), static_cast<const float*>(W) + r * cols, static_cast<size_t>(cols) * 4);
    } else {
      const uint16_t* w = static_cast<const uint16_t*>(W) + r * cols;
      if (wd == DType::BF16)
        for (int64_t c = 0; c < cols; ++c) wrow[c] = bf16_to_f32(w[c]);
      else
        for (int64_t c = 0; c < cols; ++c) wrow[c] = f16_to_f32(w[c]);
    }
    for (int t = 0; t < T; ++t) {
      const float* x = X + t * ldx;
      float acc = 0.f;
      for (int64_t c = 0; c < cols; ++c) acc += wrow[c] * x[c];
      Y[t * ldy + (r - r0)] = acc;
    }
  }
}

#ifdef MOERUN_X86
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* W, DType wd, int64_t i) {
  if (wd == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(W) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(W) + i));
  if (wd == DType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma,f16c"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int T>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const void* W, DType wd, int64_t cols, int64_t r0,
                                                          int64_t r1, const float* X, int64_t ldx, float* Y,
                                                          int64_t ldy) {
  const int64_t main = cols / 16 * 16;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * cols;
    __m256 acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < main; c += 16) {
      const __m256 w0 = load8(W, wd, base + c), w1 = load8(W, wd, base + c + 8);
      for (int t = 0; t < T; ++t) {
        acc0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + t * ldx + c), acc0[t]);
        acc1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + t * ldx + c + 8), acc1[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      float acc = hsum8(_mm256_add_ps(acc0[t], acc1[t]));
      for (int64_t c = main; c < cols; ++c) acc += load_as_f32(W, base + c, wd) * X[t * ldx + c];
      Y[t * ldy + (r - r0)] = acc;
    }
  }
}

__attribute__((target("avx512f"))) inline __m512 load16(const void* W, DType wd, int64_t i) {
  if (wd == DType::F32) return _mm512_loadu_ps(static_cast<const float*>(W) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(W) + i));
  if (wd == DType::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int T>
__attribute__((target("avx512f"))) void rows_avx512(const void* W, DType wd, int64_t cols, int64_t r0, int64_t r1,
                                                     const float* X, int64_t ldx, float* Y, int64_t ldy) {
  const int64_t main = cols / 32 * 32;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * cols;
    __m512 acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < main; c += 32) {
      const __m512 w0 = load16(W, wd, base + c), w1 = load16(W, wd, base + c + 16);
      for (int t = 0; t < T; ++t) {
        acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(X + t * ldx + c), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(X + t * ldx + c + 16), acc1[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      float acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
      for (int64_t c = main; c < cols; ++c) acc += load_as_f32(W, base + c, wd) * X[t * ldx + c];
      Y[t * ldy + (r - r0)] = acc;
    }
  }
}

// bf16 weights x bf16 activations with fp32 accumulation (vdpbf16ps: pairs of products per lane).
template <int T>
__attribute__((target("avx512f,avx512bf16"))) void rows_avx512_bf16(const uint16_t* W, int64_t cols, int64_t r0,
                                                                     int64_t r1, const uint16_t* Xb, int64_t ldxb,
                                                                     const float* X, int64_t ldx, float* Y,
                                                                     int64_t ldy) {
  const int64_t main = cols / 64 * 64;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* w = W + r * cols;
    __m512 acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < main; c += 64) {
      const __m512i w0 = _mm512_loadu_si512(w + c), w1 = _mm512_loadu_si512(w + c + 32);
      for (int t = 0; t < T; ++t) {
        const uint16_t* xb = Xb + t * ldxb + c;
        acc0[t] = _mm512_dpbf16_ps(acc0[t], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xb));
        acc1[t] = _mm512_dpbf16_ps(acc1[t], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xb + 32));
      }
    }
    for (int t = 0; t < T; ++t) {
      float acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
      for (int64_t c = main; c < cols; ++c) acc += bf16_to_f32(w[c]) * X[t * ldx + c];
      Y[t * ldy + (r - r0)] = acc;
    }
  }
}
#endif

#ifdef MOERUN_AMX
// 64-byte tile configuration (palette 1) as ldtilecfg reads it.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Y[t, r - r0] for n <= 16 tokens and rows [r0, r1), (r1 - r0) % 16 == 0, cols % 32 == 0.
// A tiles are 16 weight rows x 32 bf16 read straight from W (no repacking); the B tile is 16 pairs of
// columns x n tokens of Xv, the activations in VNNI order: Xv[c / 2][2 t + c % 2] = X[t][c].
// C tiles (16 rows x n fp32) accumulate over cols; two row blocks per pass share each B load.
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void rows_amx(const uint16_t* W, int64_t cols, int64_t r0,
                                                                    int64_t r1, const uint16_t* Xv, int n, float* Y,
                                                                    int64_t ldy) {
  TileConfig cfg;
  for (int i = 0; i < 2; ++i) cfg.rows[i] = 16, cfg.colsb[i] = static_cast<uint16_t>(n * 4);  // tmm0-1: C
  for (int i = 2; i < 4; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;                            // tmm2-3: A
  cfg.rows[4] = 16, cfg.colsb[4] = static_cast<uint16_t>(n * 4);                              // tmm4: B
  _tile_loadconfig(&cfg);
  alignas(64) float c[16 * 16];  // [16 rows, n]
  const int64_t lda = cols * 2, ldb = n * 4;
  auto scatter = [&](int64_t row0) {
    for (int i = 0; i < 16; ++i)
      for (int t = 0; t < n; ++t) Y[t * ldy + (row0 - r0) + i] = c[i * n + t];
  };
  int64_t r = r0;
  for (; r + 32 <= r1; r += 32) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < cols; k += 32) {
      _tile_loadd(4, Xv + (k / 2) * 2 * n, ldb);
      _tile_loadd(2, W + r * cols + k, lda);
      _tile_loadd(3, W + (r + 16) * cols + k, lda);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, c, ldb);
    scatter(r);
    _tile_stored(1, c, ldb);
    scatter(r + 16);
  }
  for (; r < r1; r += 16) {
    _tile_zero(0);
    for (int64_t k = 0; k < cols; k += 32) {
      _tile_loadd(4, Xv + (k / 2) * 2 * n, ldb);
      _tile_loadd(2, W + r * cols + k, lda);
      _tile_dpbf16ps(0, 2, 4);
    }
    _tile_stored(0, c, ldb);
    scatter(r);
  }
  _tile_release();
}
#endif

template <int T>
void rows_dispatch(CpuIsa isa, const void* W, DType wd, int64_t cols, int64_t r0, int64_t r1, const Acts& x,
                   float* Y, int64_t ldy) {
#ifdef MOERUN_X86
  if (isa == CpuIsa::Avx512Bf16 && wd == DType::BF16) {
    const uint16_t* xb = x.bf16;
    int64_t ldxb = x.ld;
    if (xb == nullptr) {  // no rounded copy from the caller: round this tile once for the call's rows
      thread_local std::vector<uint16_t> own;
      own.resize(static_cast<size_t>(T * cols));
      for (int t = 0; t < T; ++t)
        for (int64_t c = 0; c < cols; ++c) own[t * cols + c] = f32_to_bf16(x.f32[t * x.ld + c]);
      xb = own.data();
      ldxb = cols;
    }
    rows_avx512_bf16<T>(static_cast<const uint16_t*>(W), cols, r0, r1, xb, ldxb, x.f32, x.ld, Y, ldy);
    return;
  }
  if (isa == CpuIsa::Avx512 || isa == CpuIsa::Avx512Bf16) return rows_avx512<T>(W, wd, cols, r0, r1, x.f32, x.ld, Y, ldy);
  if (isa == CpuIsa::Avx2) return rows_avx2<T>(W, wd, cols, r0, r1, x.f32, x.ld, Y, ldy);
#endif
  (void)isa;
  rows_scalar<T>(W, wd, cols, r0, r1, x.f32, x.ld, Y, ldy);
}

// The float format: W row-major [rows, cols] of w_dtype.
void float_rows(CpuIsa isa, const void* W, DType w_dtype, int64_t cols, int64_t r0, int64_t r1, const Acts& x,
                int64_t T, float* Y, int64_t ldy) {
  if (isa == CpuIsa::AmxBf16) {
#ifdef MOERUN_AMX
    const int64_t tiled = (r1 - r0) / 16 * 16;
    if (w_dtype == DType::BF16 && T >= kAmxMinTokens && cols % 32 == 0 && tiled > 0) {
      for (int64_t t0 = 0; t0 < T; t0 += 16) {
        const int n = static_cast<int>(T - t0 < 16 ? T - t0 : 16);
        const uint16_t* xv = T <= 16 ? x.vnni : nullptr;
        if (xv == nullptr) {  // no VNNI tile from the caller: pack this one for the call
          thread_local std::vector<uint16_t> own;
          own.resize(static_cast<size_t>(cols * n));
          for (int t = 0; t < n; ++t)
            for (int64_t c = 0; c < cols; ++c)
              own[vnni_index(c, t, n)] = x.bf16 != nullptr ? x.bf16[(t0 + t) * x.ld + c]
                                                           : f32_to_bf16(x.f32[(t0 + t) * x.ld + c]);
          xv = own.data();
        }
        rows_amx(static_cast<const uint16_t*>(W), cols, r0, r0 + tiled, xv, n, Y + t0 * ldy, ldy);
      }
      if (r0 + tiled < r1)  // rows past the last whole tile
        float_rows(CpuIsa::Avx512Bf16, W, w_dtype, cols, r0 + tiled, r1, x, T, Y + tiled, ldy);
      return;
    }
#endif
    isa = CpuIsa::Avx512Bf16;  // AMX is a superset: the AVX-512-BF16 kernels serve everything else
  }
  // Tiles of up to 4 tokens share each weight load (the weights, not the tokens, are the traffic).
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const Acts xt{x.f32 + t0 * x.ld, x.ld, x.bf16 != nullptr ? x.bf16 + t0 * x.ld : nullptr, nullptr};
    float* y = Y + t0 * ldy;
    switch (static_cast<int>(T - t0 < 4 ? T - t0 : 4)) {
      case 1: rows_dispatch<1>(isa, W, w_dtype, cols, r0, r1, xt, y, ldy); break;
      case 2: rows_dispatch<2>(isa, W, w_dtype, cols, r0, r1, xt, y, ldy); break;
      case 3: rows_dispatch<3>(isa, W, w_dtype, cols, r0, r1, xt, y, ldy); break;
      default: rows_dispatch<4>(isa, W, w_dtype, cols, r0, r1, xt, y, ldy); break;
    }
  }
}

// -- quantized formats ------------------------------------------------------------------------------------------
// Every kernel below computes the rows of one SlotMatrix for T <= 4 tokens. X: fp32 [T, ldx] in column order;
// Xn: the same in nibble order (4-bit formats). A vector path decodes 16 (AVX-512) or 8 (AVX2) weights per
// step into fp32 lanes and runs one FMA per token on them. Per-channel and per-block scales multiply the
// block's partial sums; 4-bit groups decode through a 16-entry table of the group's dequantized values.

// fp32 scale i of a matrix (fp8, fp8-block128, int8, int4).
inline float scale_f32(const SlotMatrix& W, int64_t i) {
  float s;
  std::memcpy(&s, W.scales + 4 * i, 4);
  return s;
}

// Columns that share one fp32 scale in row r of a per-channel or per-block format, and that scale.
inline int64_t scale_block_cols(const SlotMatrix& W) {
  return W.format.kind == FormatKind::Fp8Block ? W.format.group : W.cols;
}
inline float row_block_scale(const SlotMatrix& W, int64_t r, int64_t c) {
  return W.format.kind == FormatKind::Fp8Block ? fp8_block_scale(W, r, c) : scale_f32(W, r);
}

// Portable path: each row decoded to fp32 (decode_rows, the formats' exact decode), then dotted.
template <int T>
void quantized_scalar(const SlotMatrix& W, int64_t r0, int64_t r1, const float* X, int64_t ldx, float* Y,
                      int64_t ldy) {
  thread_local std::vector<float> row;
  row.resize(static_cast<size_t>(W.cols));
  for (int64_t r = r0; r < r1; ++r) {
    decode_rows(W, r, r + 1, row.data());
    for (int t = 0; t < T; ++t) {
      const float* x = X + t * ldx;
      float acc = 0.f;
      for (int64_t c = 0; c < W.cols; ++c) acc += row[c] * x[c];
      Y[t * ldy + (r - r0)] = acc;
    }
  }
}

#ifdef MOERUN_X86
// fp8 e4m3fn bytes as fp16 bits (sign to bit 15, exponent and mantissa to bits 13..7): the fp16 value is the
// e4m3fn value times 2^-8, subnormals included, so a hardware fp16 -> fp32 conversion decodes it exactly and
// the 2^8 goes into the scale. kFp8Unscale undoes it.
constexpr float kFp8Unscale = 256.f;

__attribute__((target("avx2,fma,f16c"))) inline __m256 fp8x8(const uint8_t* p) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(b, 8), _mm_set1_epi16(static_cast<short>(0x8000))),
                                 _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(0x3f80)));
  return _mm256_cvtph_ps(h);
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 int8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx512f,avx2,fma,f16c"))) inline __m512 fp8x16(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h =
      _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(b, 8), _mm256_set1_epi16(static_cast<short>(0x8000))),
                      _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(0x3f80)));
  return _mm512_cvtph_ps(h);
}
__attribute__((target("avx512f"))) inline __m512 int8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// fp8, fp8-block128 and int8: byte weights, one fp32 scale per row or per 128 x 128 block. Partial sums of
// each scale block are scaled once; in-block columns past the last whole vector take the scalar decode.
template <int T, bool kInt8>
__attribute__((target("avx512f,avx2,fma,f16c"))) void bytes_avx512(const SlotMatrix& W, int64_t r0, int64_t r1,
                                                                    const float* X, int64_t ldx, float* Y,
                                                                    int64_t ldy) {
  const int64_t cols = W.cols, bw = scale_block_cols(W);
  const float unscale = kInt8 ? 1.f : kFp8Unscale;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W.weights + r * cols;
    __m512 acc[T];
    float tail[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps(), tail[t] = 0.f;
    for (int64_t c0 = 0; c0 < cols; c0 += bw) {
      const int64_t c1 = std::min(cols, c0 + bw);
      __m512 p0[T], p1[T];
      for (int t = 0; t < T; ++t) p0[t] = p1[t] = _mm512_setzero_ps();
      int64_t c = c0;
      for (; c + 32 <= c1; c += 32) {
        const __m512 w0 = kInt8 ? int8x16(w + c) : fp8x16(w + c);
        const __m512 w1 = kInt8 ? int8x16(w + c + 16) : fp8x16(w + c + 16);
        for (int t = 0; t < T; ++t) {
          p0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(X + t * ldx + c), p0[t]);
          p1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(X + t * ldx + c + 16), p1[t]);
        }
      }
      for (; c + 16 <= c1; c += 16) {
        const __m512 w0 = kInt8 ? int8x16(w + c) : fp8x16(w + c);
        for (int t = 0; t < T; ++t) p0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(X + t * ldx + c), p0[t]);
      }
      const float s = row_block_scale(W, r, c0);
      const __m512 sv = _mm512_set1_ps(s * unscale);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(_mm512_add_ps(p0[t], p1[t]), sv, acc[t]);
      for (; c < c1; ++c) {
        const float q = kInt8 ? static_cast<float>(static_cast<int8_t>(w[c])) : e4m3fn_to_f32(w[c]);
        for (int t = 0; t < T; ++t) tail[t] += q * s * X[t * ldx + c];
      }
    }
    for (int t = 0; t < T; ++t) Y[t * ldy + (r - r0)] = _mm512_reduce_add_ps(acc[t]) + tail[t];
  }
}

template <int T, bool kInt8>
__attribute__((target("avx2,fma,f16c"))) void bytes_avx2(const SlotMatrix& W, int64_t r0, int64_t r1, const float* X,
                                                          int64_t ldx, float* Y, int64_t ldy) {
  const int64_t cols = W.cols, bw = scale_block_cols(W);
  const float unscale = kInt8 ? 1.f : kFp8Unscale;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W.weights + r * cols;
    __m256 acc[T];
    float tail[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps(), tail[t] = 0.f;
    for (int64_t c0 = 0; c0 < cols; c0 += bw) {
      const int64_t c1 = std::min(cols, c0 + bw);
      __m256 p0[T], p1[T];
      for (int t = 0; t < T; ++t) p0[t] = p1[t] = _mm256_setzero_ps();
      int64_t c = c0;
      for (; c + 16 <= c1; c += 16) {
        const __m256 w0 = kInt8 ? int8x8(w + c) : fp8x8(w + c);
        const __m256 w1 = kInt8 ? int8x8(w + c + 8) : fp8x8(w + c + 8);
        for (int t = 0; t < T; ++t) {
          p0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + t * ldx + c), p0[t]);
          p1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(X + t * ldx + c + 8), p1[t]);
        }
      }
      for (; c + 8 <= c1; c += 8) {
        const __m256 w0 = kInt8 ? int8x8(w + c) : fp8x8(w + c);
        for (int t = 0; t < T; ++t) p0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(X + t * ldx + c), p0[t]);
      }
      const float s = row_block_scale(W, r, c0);
      const __m256 sv = _mm256_set1_ps(s * unscale);
      for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(_mm256_add_ps(p0[t], p1[t]), sv, acc[t]);
      for (; c < c1; ++c) {
        const float q = kInt8 ? static_cast<float>(static_cast<int8_t>(w[c])) : e4m3fn_to_f32(w[c]);
        for (int t = 0; t < T; ++t) tail[t] += q * s * X[t * ldx + c];
      }
    }
    for (int t = 0; t < T; ++t) Y[t * ldy + (r - r0)] = hsum8(acc[t]) + tail[t];
  }
}

// int4 and mxfp4: per group, the 16 values a nibble can decode to ((q - zero) * scale, or e2m1 * 2^(e - 127):
// each one fp32 multiply of exact operands, so the table holds the exact decoded weights) sit in one register;
// vpermps looks 16 nibbles up at once (it reads the low 4 bits of each lane, so a low nibble needs no mask).
template <int T, bool kMx>
__attribute__((target("avx512f"))) void nibbles_avx512(const SlotMatrix& W, int64_t r0, int64_t r1, const float* Xn,
                                                        int64_t ldx, float* Y, int64_t ldy) {
  const int64_t cols = W.cols, G = W.format.group, groups = cols / G;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 e2m1 = _mm512_loadu_ps(kE2m1Values);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W.weights + r * cols / 2;
    __m512 acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t gi = r * groups + g;
      const __m512 lut =
          kMx ? _mm512_mul_ps(e2m1, _mm512_set1_ps(e8m0_to_f32(W.scales[gi])))
              : _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(W.zeros[gi]))),
                              _mm512_set1_ps(scale_f32(W, gi)));
      for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2)));
        const __m512 lo = _mm512_permutexvar_ps(b, lut);                         // columns c, c + 2, ...
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);  // columns c + 1, c + 3, ...
        for (int t = 0; t < T; ++t) {
          acc0[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(Xn + t * ldx + c), acc0[t]);
          acc1[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(Xn + t * ldx + c + 16), acc1[t]);
        }
      }
    }
    for (int t = 0; t < T; ++t) Y[t * ldy + (r - r0)] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
  }
}

// Eight nibbles q (one per lane) decoded: int4 (q - z) * s; mxfp4 the e2m1 magnitude of q's low 3 bits times
// s, bit 3 moved to the sign.
template <bool kMx>
__attribute__((target("avx2,fma"))) inline __m256 nibbles8(__m256i q, __m256 mag, __m256 s, __m256 z, __m256i sign) {
  if (kMx) {
    const __m256 v = _mm256_mul_ps(_mm256_permutevar8x32_ps(mag, q), s);
    return _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(q, 28), sign)));
  }
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), z), s);
}

// AVX2 has an 8-entry vpermps: int4 decodes arithmetically ((q - zero) * scale, the same exact product), and
// mxfp4 looks up the magnitude of the low 3 bits and moves bit 3 to the sign.
template <int T, bool kMx>
__attribute__((target("avx2,fma"))) void nibbles_avx2(const SlotMatrix& W, int64_t r0, int64_t r1, const float* Xn,
                                                       int64_t ldx, float* Y, int64_t ldy) {
  const int64_t cols = W.cols, G = W.format.group, groups = cols / G;
  const __m256 mag = _mm256_loadu_ps(kE2m1Values);
  const __m256i nib = _mm256_set1_epi32(15), sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = W.weights + r * cols / 2;
    __m256 acc0[T], acc1[T];
    for (int t = 0; t < T; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t gi = r * groups + g;
      const __m256 s = _mm256_set1_ps(kMx ? e8m0_to_f32(W.scales[gi]) : scale_f32(W, gi));
      const __m256 z = _mm256_set1_ps(kMx ? 0.f : static_cast<float>(W.zeros[gi]));
      for (int64_t c = g * G; c < (g + 1) * G; c += 32) {
        for (int half = 0; half < 2; ++half) {  // bytes 8 * half .. + 8: columns c + 16 * half + 0, 2, ..., 14 and odd
          const __m256i b =
              _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + c / 2 + 8 * half)));
          const __m256 lo = nibbles8<kMx>(_mm256_and_si256(b, nib), mag, s, z, sign);
          const __m256 hi = nibbles8<kMx>(_mm256_srli_epi32(b, 4), mag, s, z, sign);
          for (int t = 0; t < T; ++t) {
            acc0[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(Xn + t * ldx + c + 8 * half), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(Xn + t * ldx + c + 16 + 8 * half), acc1[t]);
          }
        }
      }
    }
    for (int t = 0; t < T; ++t) Y[t * ldy + (r - r0)] = hsum8(_mm256_add_ps(acc0[t], acc1[t]));
  }
}
#endif

template <int T>
void quantized_dispatch(CpuIsa isa, const SlotMatrix& W, int64_t r0, int64_t r1, const float* X, int64_t ldx,
                        const float* Xn, int64_t ldn, float* Y, int64_t ldy) {
#ifdef MOERUN_X86
  const bool avx512 = isa == CpuIsa::Avx512 || isa == CpuIsa::Avx512Bf16 || isa == CpuIsa::AmxBf16;
  if (avx512 || isa == CpuIsa::Avx2) {
    switch (W.format.kind) {
      case FormatKind::Fp8Channel:
      case FormatKind::Fp8Block:
        return avx512 ? bytes_avx512<T, false>(W, r0, r1, X, ldx, Y, ldy) : bytes_avx2<T, false>(W, r0, r1, X, ldx, Y, ldy);
      case FormatKind::Int8Channel:
        return avx512 ? bytes_avx512<T, true>(W, r0, r1, X, ldx, Y, ldy) : bytes_avx2<T, true>(W, r0, r1, X, ldx, Y, ldy);
      case FormatKind::Int4Group:
        return avx512 ? nibbles_avx512<T, false>(W, r0, r1, Xn, ldn, Y, ldy)
                      : nibbles_avx2<T, false>(W, r0, r1, Xn, ldn, Y, ldy);
      case FormatKind::Mxfp4:
        return avx512 ? nibbles_avx512<T, true>(W, r0, r1, Xn, ldn, Y, ldy)
                      : nibbles_avx2<T, true>(W, r0, r1, Xn, ldn, Y, ldy);
      case FormatKind::Float: break;
    }
  }
#endif
  (void)isa, (void)Xn, (void)ldn;
  quantized_scalar<T>(W, r0, r1, X, ldx, Y, ldy);
}

}  // namespace

void matmul_rows(CpuIsa isa, const SlotMatrix& W, int64_t r0, int64_t r1, const Acts& x, int64_t T, float* Y,
                 int64_t ldy) {
  if (W.format.kind == FormatKind::Float) return float_rows(isa, W.weights, W.dtype, W.cols, r0, r1, x, T, Y, ldy);
  const float* nib = x.nib;
  if (nibble_format(W.format) && nib == nullptr && isa != CpuIsa::Scalar) {
    // No nibble-ordered copy from the caller: make this call's (the caller's copy saves it per call).
    thread_local std::vector<float> own;
    own.resize(static_cast<size_t>(T * W.cols));
    for (int64_t t = 0; t < T; ++t) to_nibble_order(x.f32 + t * x.ld, own.data() + t * W.cols, W.cols);
    nib = own.data();
  }
  const int64_t ldn = x.nib != nullptr ? x.ld : W.cols;
  // Tiles of up to 4 tokens share each decoded weight vector (the weights, not the tokens, are the traffic).
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const float* xt = x.f32 + t0 * x.ld;
    const float* nt = nib != nullptr ? nib + t0 * ldn : nullptr;
    float* y = Y + t0 * ldy;
    switch (static_cast<int>(T - t0 < 4 ? T - t0 : 4)) {
      case 1: quantized_dispatch<1>(isa, W, r0, r1, xt, x.ld, nt, ldn, y, ldy); break;
      case 2: quantized_dispatch<2>(isa, W, r0, r1, xt, x.ld, nt, ldn, y, ldy); break;
      case 3: quantized_dispatch<3>(isa, W, r0, r1, xt, x.ld, nt, ldn, y, ldy); break;
      default: quantized_dispatch<4>(isa, W, r0, r1, xt, x.ld, nt, ldn, y, ldy); break;
    }
  }
}

}  // namespace moerun
