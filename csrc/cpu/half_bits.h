// fp16 <-> fp32 conversions in plain integer and float arithmetic that the compiler vectorizes, for kernels built
// for several ISAs (target_clones): c10::Half's conversions compile to scalar code there (its F16C path is chosen at
// preprocessing, for the baseline ISA), and in the fp16 distillation loss the gradient's rounding store was the
// hottest spot of a row (perf). to_float is exact; from_float rounds to nearest even; subnormals, infinities and NaN
// included (tests/test_distill.py checks both against torch over every fp16 value and the midpoints between them).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define EK_HALF_BITS_INLINE inline __attribute__((always_inline))
#else
#define EK_HALF_BITS_INLINE inline
#endif

namespace effikern {
namespace half_bits {

// The selects are written as bit masks: GCC left `?:` as branches here, which kept these loops scalar.
EK_HALF_BITS_INLINE uint32_t mask_if(bool c) { return 0u - static_cast<uint32_t>(c); }

EK_HALF_BITS_INLINE float to_float(uint16_t h) {
  const uint32_t w = h;
  const uint32_t sign = (w & 0x8000u) << 16;
  const uint32_t em = w & 0x7fffu;  // exponent and mantissa
  // Normal: move into place and rebias the exponent by 127 - 15; inf/NaN (exponent 31) by another 128 - 16.
  const uint32_t normal = (em << 13) + 0x38000000u + (mask_if(em >= 0x7c00u) & 0x38000000u);
  const float subnormal = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f;  // em * 2^-24
  uint32_t sub_bits;
  std::memcpy(&sub_bits, &subnormal, sizeof(sub_bits));
  const uint32_t is_sub = mask_if(em < 0x400u);
  const uint32_t bits = sign | (sub_bits & is_sub) | (normal & ~is_sub);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

EK_HALF_BITS_INLINE uint16_t from_float(float x) {
  uint32_t f;
  std::memcpy(&f, &x, sizeof(f));
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7fffffffu;
  // Below 2^-14 (fp16 subnormals): |x| + 0.5 rounds |x| to a multiple of 2^-24 (the float ulp at 0.5) in hardware,
  // and its mantissa is then the fp16 mantissa (1024: the smallest normal, encoded the same way).
  float ax;
  std::memcpy(&ax, &a, sizeof(ax));
  const float shifted = ax + 0.5f;
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const uint32_t subnormal = shifted_bits - 0x3f000000u;
  // Normal: rebias the exponent by 127 - 15 and round the mantissa from 23 to 10 bits, ties to even (a carry moves
  // into the exponent, as it should).
  const uint32_t m = a - 0x38000000u;
  const uint32_t normal = (m + 0xfffu + ((m >> 13) & 1u)) >> 13;
  const uint32_t is_sub = mask_if(a < 0x38800000u);
  uint32_t h = (subnormal & is_sub) | (normal & ~is_sub);
  const uint32_t is_inf = mask_if(a >= 0x477ff000u);  // 65520 and above round to infinity
  h = (0x7c00u & is_inf) | (h & ~is_inf);
  const uint32_t is_nan = mask_if(a > 0x7f800000u);  // NaN stays a (quiet) NaN
  h = (0x7e00u & is_nan) | (h & ~is_nan);
  return static_cast<uint16_t>(sign | h);
}

}  // namespace half_bits
}  // namespace effikern
