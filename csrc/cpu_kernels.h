// Matrix-times-few-vectors kernels of the CPU executor and the host fused MoE, one per instruction set,
// chosen at run time, over a slot's matrices in every expert format. Every ISA-specific function is
// compiled with __attribute__((target(...))) and only called after cpuid (and, for AVX-512, the OS's xsave
// state) says the CPU can run it, so one build runs on any x86-64 CPU and on other architectures (the
// portable path only).
// Quantized formats are read as packed bytes and dequantized in registers, 16 weights at a time, with fp32
// activations and fp32 accumulation: the weights stream from memory once per call for all its tokens, at
// their packed size, which is what bounds a CPU expert with few tokens.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "expert_codec.h"

namespace moerun {

enum class CpuIsa : int32_t { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, AmxBf16 = 4 };

// Below this many tokens the AMX path hands bf16 work to the AVX-512-BF16 kernel: with one or two
// tokens the dot products already stream weights as fast as memory delivers them, and a tile
// configuration per call would only add cost.
constexpr int64_t kAmxMinTokens = 4;

const char* cpu_isa_name(CpuIsa isa);
// Best ISA this CPU and OS support (AMX only once Linux grants this process the tile data state,
// arch_prctl(ARCH_REQ_XCOMP_PERM)). MOERUN_CPU_ISA=scalar|avx2|avx512|avx512_bf16|amx_bf16 caps it.
CpuIsa detect_cpu_isa();

// Activations of one matmul_rows call: T token rows of fp32, plus, for bf16 weights on AVX-512-BF16 and
// AMX, the same rows rounded to bf16 once per job by the caller so no kernel call converts them again
// (with many tokens, converting per call of 32 weight rows costs more than the dot products).
struct Acts {
  const float* f32;                // [T, ld]
  int64_t ld;
  const uint16_t* bf16 = nullptr;  // [T, ld] rounded to bf16, or null (the kernel rounds per call)
  const uint16_t* vnni = nullptr;  // AMX, T <= 16: the bf16 rows in VNNI order (vnni_index), or null
  const float* nib = nullptr;      // 4-bit formats: [T, ld] the rows in nibble order (nibble_index), or null
};

// 4-bit formats hold columns 2j and 2j + 1 in the low and high nibble of byte j. Their kernels take the
// activations with each run of 32 columns reordered evens first, then odds, so the 16 low nibbles and the 16
// high nibbles of 16 bytes each meet 16 consecutive activations and no weight is shuffled.
inline bool nibble_format(const ExpertFormat& f) {
  return f.kind == FormatKind::Int4Group || f.kind == FormatKind::Mxfp4;
}
inline int64_t nibble_index(int64_t c) { return c / 32 * 32 + (c % 2) * 16 + (c % 32) / 2; }
// dst[nibble_index(c)] = src[c] for c in [0, cols), cols a multiple of 32 (every 4-bit format's groups are).
inline void to_nibble_order(const float* src, float* dst, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c) dst[nibble_index(c)] = src[c];
}

// Where activation (token t, column c) of a tile of n <= 16 tokens sits in VNNI order: pairs of
// columns per token, tokens side by side, so one AMX B-tile row holds 2 columns of all n tokens.
inline int64_t vnni_index(int64_t c, int64_t t, int64_t n) { return (c / 2) * 2 * n + 2 * t + (c % 2); }

// Y[t, r - r0] = sum_c W[r, c] * X[t, c] for r in [r0, r1), t in [0, T), W[r, c] the format's decoded
// weight (expert_codec.h). Y: fp32 [T, ldy]. Accumulates in fp32. Float format: the AVX-512-BF16 and AMX
// paths use the bf16-rounded activations, as a bf16 model's activations already are; AMX tiles serve bf16
// weights with T >= kAmxMinTokens, cols % 32 == 0, in blocks of 16 rows. Quantized formats: fp32
// activations on every ISA (AVX-512 or AVX2 decoders; the portable path decodes a row with decode_rows).
void matmul_rows(CpuIsa isa, const SlotMatrix& W, int64_t r0, int64_t r1, const Acts& x, int64_t T, float* Y,
                 int64_t ldy);

}  // namespace moerun
