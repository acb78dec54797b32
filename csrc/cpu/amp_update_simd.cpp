// amp_update_simd.h's one-pass AdamW and SGD in AVX2 + FMA + F16C (8 floats a vector, two vectors a step), compiled
// inside a `#pragma GCC target` region so that the intrinsics and the vector arithmetic build for that ISA while
// the rest of the library stays baseline x86-64; the CPU is asked at run time (isa_dispatch.h's level(), which
// EFFIKERN_CPU_ISA caps).
//
// AVX-512 CPUs run this AVX2 code too, for fp16 and bf16. A 16-lane build is the obvious next step, but no
// AVX-512 machine was at hand to test it when this was written, and untested vector code does not ship.
#include "amp_update_simd.h"

#include "isa_dispatch.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EK_AMP_SIMD 1
#include <immintrin.h>
#endif

namespace effikern {
namespace amp_simd {

#ifdef EK_AMP_SIMD
#define EK_SIMD_INLINE inline __attribute__((always_inline))

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {
using V = __m256;
constexpr int64_t kLanes = 8;

EK_SIMD_INLINE V splat(float x) { return _mm256_set1_ps(x); }

EK_SIMD_INLINE V load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
EK_SIMD_INLINE void store_f16(uint16_t* p, V x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// bfloat16 -> float is exact: a bf16 is the top half of a float. 2 x 8 bf16 become two vectors in the lane order
// (0-3, 8-11), (4-7, 12-15): one unpack each, within the 128-bit halves, puts every bf16 in the top half of a
// 32-bit lane. The update is elementwise, so only the load and the store need to agree on the order; the
// sign-extending alternative (vpmovzxwd + shift per 8) cost a quarter more time per element.
EK_SIMD_INLINE void load_bf16_pair(const uint16_t* p, V& a, V& b) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), zero = _mm256_setzero_si256();
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));
}

// float -> bfloat16 bits (in the low half of each 32-bit lane): half_convert.h's f32_to_bf16 (round to nearest
// even, NaN to 0x7FC0), eight lanes at a time.
EK_SIMD_INLINE __m256i round_to_bf16_bits(V x) {
  const __m256i w = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(w, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(w, _mm256_set1_epi32(0x7FFF)), odd), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}
// The inverse of load_bf16_pair: packus within each 128-bit half interleaves a's and b's four lanes back.
EK_SIMD_INLINE void store_bf16_pair(uint16_t* p, V a, V b) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_packus_epi32(round_to_bf16_bits(a), round_to_bf16_bits(b)));
}

// Elements [i, i + 2 kLanes) as two float vectors, and back.
template <Storage kFmt>
EK_SIMD_INLINE void load_pair(const void* base, int64_t i, V& a, V& b) {
  if constexpr (kFmt == Storage::kF32) {
    const float* f = static_cast<const float*>(base) + i;
    a = _mm256_loadu_ps(f), b = _mm256_loadu_ps(f + kLanes);
  } else if constexpr (kFmt == Storage::kF16) {
    const uint16_t* h = static_cast<const uint16_t*>(base) + i;
    a = load_f16(h), b = load_f16(h + kLanes);
  } else {
    load_bf16_pair(static_cast<const uint16_t*>(base) + i, a, b);
  }
}

template <Storage kFmt>
EK_SIMD_INLINE void store_pair(void* base, int64_t i, V a, V b) {
  if constexpr (kFmt == Storage::kF32) {
    float* f = static_cast<float*>(base) + i;
    _mm256_storeu_ps(f, a), _mm256_storeu_ps(f + kLanes, b);
  } else if constexpr (kFmt == Storage::kF16) {
    uint16_t* h = static_cast<uint16_t*>(base) + i;
    store_f16(h, a), store_f16(h + kLanes, b);
  } else {
    store_bf16_pair(static_cast<uint16_t*>(base) + i, a, b);
  }
}

// Elements [0, k), k = n rounded down to a multiple of 2 kLanes; returns k. The math is amp_cpu.cpp's
// adamw_math, operation for operation (torch's fused AdamW), with its two divides, so the rounding is torch's
// rather than a reciprocal's.
template <Storage kFmt, bool kLerpFromM>
int64_t adamw(void* p, const void* g, void* m, void* v, int64_t n, const AdamConsts& c) {
  const V grad_factor = splat(c.grad_factor), decay = splat(c.decay), lerp_w = splat(c.lerp_w);
  const V one_minus_lerp_w = splat(1.0f - c.lerp_w), beta2 = splat(c.beta2);
  const V one_minus_beta2 = splat(c.one_minus_beta2), bc2_sqrt = splat(c.bc2_sqrt);
  const V step_size = splat(c.step_size), eps = splat(c.eps);
  const int64_t k = n / (2 * kLanes) * (2 * kLanes);
  V gs[2], ms[2], vs[2], ps[2];
  for (int64_t i = 0; i < k; i += 2 * kLanes) {
    load_pair<kFmt>(g, i, gs[0], gs[1]);
    load_pair<kFmt>(m, i, ms[0], ms[1]);
    load_pair<kFmt>(v, i, vs[0], vs[1]);
    load_pair<kFmt>(p, i, ps[0], ps[1]);
    for (int h = 0; h < 2; ++h) {
      const V gi = gs[h] * grad_factor, m0 = ms[h];
      // torch's lerp: anchored at the nearer end, so weight 1 gives exactly g.
      ms[h] = kLerpFromM ? m0 + lerp_w * (gi - m0) : gi - (gi - m0) * one_minus_lerp_w;
      vs[h] = vs[h] * beta2 + one_minus_beta2 * gi * gi;
      const V denom = _mm256_sqrt_ps(vs[h]) / bc2_sqrt + eps;
      const V pi = ps[h] * decay;  // torch's p.mul_(1 - lr * wd), rounded, then the step
      ps[h] = pi - step_size * (ms[h] / denom);
    }
    store_pair<kFmt>(m, i, ms[0], ms[1]);
    store_pair<kFmt>(v, i, vs[0], vs[1]);
    store_pair<kFmt>(p, i, ps[0], ps[1]);
  }
  return k;
}

// x rounded to the storage format and read back: what a value stored and loaded again holds.
template <Storage kFmt>
EK_SIMD_INLINE V rounded(V x) {
  if constexpr (kFmt == Storage::kF32) {
    return x;
  } else if constexpr (kFmt == Storage::kF16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(round_to_bf16_bits(x), 16));
  }
}

// Elements [0, k) as adamw; amp_cpu.cpp's sgd_body, operation for operation. torch keeps the momentum buffer in
// the param's dtype and steps with its rounded value: so does this (rounded()).
template <Storage kFmt, bool kMomentum>
int64_t sgd(void* p, const void* g, void* buf, int64_t n, const SgdConsts& c) {
  const V grad_factor = splat(c.grad_factor), weight_decay = splat(c.weight_decay), momentum = splat(c.momentum);
  const V one_minus_dampening = splat(c.one_minus_dampening), neg_lr = splat(c.neg_lr);
  const bool first = c.first, nesterov = c.nesterov;
  const int64_t k = n / (2 * kLanes) * (2 * kLanes);
  V gs[2], ps[2], bs[2];
  for (int64_t i = 0; i < k; i += 2 * kLanes) {
    load_pair<kFmt>(p, i, ps[0], ps[1]);
    load_pair<kFmt>(g, i, gs[0], gs[1]);
    if (kMomentum && !first) load_pair<kFmt>(buf, i, bs[0], bs[1]);
    for (int h = 0; h < 2; ++h) {
      V step = gs[h] * grad_factor + weight_decay * ps[h];
      if constexpr (kMomentum) {
        bs[h] = first ? step : bs[h] * momentum + one_minus_dampening * step;
        const V b = rounded<kFmt>(bs[h]);
        step = nesterov ? step + momentum * b : b;
      }
      ps[h] = ps[h] + neg_lr * step;
    }
    if (kMomentum) store_pair<kFmt>(buf, i, bs[0], bs[1]);
    store_pair<kFmt>(p, i, ps[0], ps[1]);
  }
  return k;
}

template <Storage kFmt>
int64_t sgd_with_or_without_momentum(void* p, const void* g, void* buf, int64_t n, const SgdConsts& c) {
  return c.has_momentum ? sgd<kFmt, true>(p, g, buf, n, c) : sgd<kFmt, false>(p, g, buf, n, c);
}

template <Storage kFmt>
int64_t adamw_either_lerp(void* p, const void* g, void* m, void* v, int64_t n, const AdamConsts& c) {
  return c.lerp_w < 0.5f ? adamw<kFmt, true>(p, g, m, v, n, c) : adamw<kFmt, false>(p, g, m, v, n, c);
}
}  // namespace
#pragma GCC pop_options

namespace {
// AVX2 + FMA (isa::level() >= 1) does not by itself promise F16C; every such CPU has it, but ask.
const bool kHasF16C = [] {
  __builtin_cpu_init();
  return static_cast<bool>(__builtin_cpu_supports("f16c"));
}();

// Whether these kernels run tensors of this format here. float32 on AVX-512 runs amp_cpu.cpp's avx512f clones
// instead, measured there (AdamW 1.21x, SGD 1.24x torch fused: benchmarks/results/amp/cpu-AMD-EPYC-2t.json).
bool runs(Storage fmt) {
  const int level = isa::level();
  return level >= 1 && kHasF16C && !(fmt == Storage::kF32 && level == 2);
}
}  // namespace
#endif  // EK_AMP_SIMD

int64_t adamw_simd(Storage fmt, void* p, const void* g, void* m, void* v, int64_t n, const AdamConsts& c) {
#ifdef EK_AMP_SIMD
  if (runs(fmt)) {
    switch (fmt) {
      case Storage::kF32: return adamw_either_lerp<Storage::kF32>(p, g, m, v, n, c);
      case Storage::kF16: return adamw_either_lerp<Storage::kF16>(p, g, m, v, n, c);
      case Storage::kBF16: return adamw_either_lerp<Storage::kBF16>(p, g, m, v, n, c);
    }
  }
#endif
  (void)fmt, (void)p, (void)g, (void)m, (void)v, (void)n, (void)c;
  return 0;
}

int64_t sgd_simd(Storage fmt, void* p, const void* g, void* buf, int64_t n, const SgdConsts& c) {
#ifdef EK_AMP_SIMD
  if (runs(fmt)) {
    switch (fmt) {
      case Storage::kF32: return sgd_with_or_without_momentum<Storage::kF32>(p, g, buf, n, c);
      case Storage::kF16: return sgd_with_or_without_momentum<Storage::kF16>(p, g, buf, n, c);
      case Storage::kBF16: return sgd_with_or_without_momentum<Storage::kBF16>(p, g, buf, n, c);
    }
  }
#endif
  (void)fmt, (void)p, (void)g, (void)buf, (void)n, (void)c;
  return 0;
}

}  // namespace amp_simd
}  // namespace effikern
