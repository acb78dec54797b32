// IEEE half (fp16) and bfloat16 <-> float for the CPU kernels that keep 16-bit tensors and compute in fp32 (the
// loss-scaling kernels of amp_cpu.cpp, the distillation loss of distill_cpu.cpp and its backward's
// scale_rows_cpu.cpp). Raw 16-bit values are uint16_t bit patterns.
//
// The block functions are the fast path: F16C's vcvtph2ps / vcvtps2ph where the CPU has them (every x86-64 CPU
// since 2013, checked at run time), the portable scalar functions elsewhere and for the tails. GCC does not
// vectorize the bit manipulations of the scalar functions well, nor does c10::Half's conversion vectorize inside
// target_clones functions (its F16C path is chosen at preprocessing time, for the baseline ISA).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Forced inline: called from target_clones functions, which must not call a copy compiled for the baseline ISA.
#if defined(__GNUC__)
#define EK_HALF_INLINE inline __attribute__((always_inline))
#else
#define EK_HALF_INLINE inline
#endif

namespace effikern {
namespace half_convert {

EK_HALF_INLINE float bits_to_f32(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

EK_HALF_INLINE uint32_t f32_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  return w;
}

// half -> float, exact, denormals included: the exponent is rebased by a float multiply (normals) or the mantissa
// is placed under a magic exponent and the bias subtracted (denormals); inf/nan map to inf/nan.
EK_HALF_INLINE float half_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
  return bits_to_f32(sign | magnitude);
}

// float -> half, round to nearest even, overflow to inf, nan to a quiet nan. The rounding is done by the FPU:
// adding a power of two chosen from the input's exponent leaves exactly the half's mantissa bits.
EK_HALF_INLINE uint16_t f32_to_half(float f) {
  const float base0 = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const uint32_t bits = f32_to_bits(bits_to_f32((bias >> 1) + 0x07800000u) + base0);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// bfloat16 -> float: exact, a bf16 is the top half of a float.
EK_HALF_INLINE float bf16_to_f32(uint16_t b) { return bits_to_f32(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16, round to nearest even (as c10::BFloat16): adding 0x7FFF plus the lowest kept bit carries into
// the kept half exactly when the dropped half is above the midpoint, or at it with an odd kept half. A NaN becomes
// the quiet NaN 0x7FC0 (the carry could turn it into an infinity). Plain integer code, which vectorizes.
EK_HALF_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t w = f32_to_bits(f);
  const uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// dst[i] = half_to_f32(src[i]) for i < n, with F16C where the CPU has it.
void half_block_to_f32(const uint16_t* src, float* dst, int64_t n);

// dst[i] = f32_to_half(src[i]) for i < n, with F16C where the CPU has it.
void f32_block_to_half(const float* src, uint16_t* dst, int64_t n);

}  // namespace half_convert
}  // namespace effikern
