// The few-token forward of the panelled CSR with AVX-512 gathers: 16 entries of a segment per
// instruction instead of one scalar load each.
//
// Why a separate path: with 1-4 tokens each nonzero feeds 1-4 FMAs, so the scalar loop is bound by its loads and
// loop overhead (measured ~2 cycles per nonzero, 1.2 ms at 4096 x 4096, 90% sparse, 1 thread, Zen 4: compute-bound
// at a third of the memory bandwidth). Here 16 one-byte offsets are widened in one instruction, added to the
// segment's panel base and fed to one vgatherdps per token; a segment's tail is a masked gather, so the short
// segments (~26 nonzeros per 256-column panel at 90%) cost two gathers, not a scalar remainder loop.
//
// GCC only accepts these intrinsics in a function compiled for AVX-512 (an always_inline kernel template
// instantiated for run<64> is still compiled for the baseline first), so this is a plain function with a target
// attribute, called once per thread's range of output rows from CsrRows::run<64>.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace effikern {
namespace sparse_avx512 {

#define EK_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))

// 16 consecutive values (the first `n` when masked) as fp32.
template <typename S>
EK_AVX512 inline __m512 load_values(const S* p, __mmask16 mask) {
  if constexpr (std::is_same_v<S, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {  // bf16 is the top half of an fp32
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    static_assert(std::is_same_v<S, c10::Half>, "values must be float, bfloat16 or half");
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
  }
}

/// out[m, o] = bias[o] + sum over the segments s = o*P + p of values(j) * src[m, p*256 + idx[j]] for the output rows
/// o in [o0, o1) and MM tokens. src [MM, R] fp32 (row stride R); crow [O*P + 1]; idx uint8; out [MM, O] in S.
template <typename S, int MM>
EK_AVX512 void gather_rows(const float* src, int64_t R, int64_t P, const int32_t* crow, const uint8_t* idx,
                           const S* values, const S* bias, S* out, int64_t O, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    // Two accumulator sets (full groups, segment tails) so consecutive FMAs of a row do not wait on each other.
    __m512 acc[2][MM];
    for (int m = 0; m < MM; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const float* base = src + p * 256;
      int64_t j = crow[o * P + p];
      const int64_t j1 = crow[o * P + p + 1];
      for (; j + 16 <= j1; j += 16) {
        const __m512i col = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + j)));
        const __m512 v = load_values(values + j, 0xFFFF);
        for (int m = 0; m < MM; ++m) {
          acc[0][m] = _mm512_fmadd_ps(v, _mm512_i32gather_ps(col, base + m * R, 4), acc[0][m]);
        }
      }
      if (j < j1) {  // the segment's last 1-15 entries: masked loads never touch the lanes past j1
        const __mmask16 mask = static_cast<__mmask16>((1u << (j1 - j)) - 1u);
        const __m512i col = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, idx + j));
        const __m512 v = load_values(values + j, mask);
        for (int m = 0; m < MM; ++m) {
          const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, col, base + m * R, 4);
          acc[1][m] = _mm512_fmadd_ps(v, xv, acc[1][m]);
        }
      }
    }
    const float b = bias != nullptr ? static_cast<float>(bias[o]) : 0.f;
    for (int m = 0; m < MM; ++m) {
      out[m * O + o] = static_cast<S>(b + _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])));
    }
  }
}

#undef EK_AVX512

}  // namespace sparse_avx512
}  // namespace effikern
#endif
