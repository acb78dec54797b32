// The block conversions of half_convert.h: F16C when the CPU has it, picked once at load time.
#include "half_convert.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define EK_HALF_X86 1
#endif

namespace effikern {
namespace half_convert {
namespace {

#ifdef EK_HALF_X86
const bool kHasF16C = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
}();

__attribute__((target("avx,f16c"))) void half_to_f32_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = half_to_f32(src[i]);
}

__attribute__((target("avx,f16c"))) void f32_to_half_f16c(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = f32_to_half(src[i]);
}
#endif

}  // namespace

void half_block_to_f32(const uint16_t* src, float* dst, int64_t n) {
#ifdef EK_HALF_X86
  if (kHasF16C) return half_to_f32_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_f32(src[i]);
}

void f32_block_to_half(const float* src, uint16_t* dst, int64_t n) {
#ifdef EK_HALF_X86
  if (kHasF16C) return f32_to_half_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_half(src[i]);
}

}  // namespace half_convert
}  // namespace effikern
