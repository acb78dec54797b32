// The stored weights of the CPU sparse kernels (csrc/cpu/sparse_cpu.cpp) read as their accumulation type, with
// fp16 weights widened a row (or a block) at a time by F16C instead of one value at a time; and their gradients
// narrowed back the same way.
//
// Why: c10::Half's float conversion is picked when the file is preprocessed, for the baseline ISA, so inside the
// AVX2 / AVX-512 kernels it is software (about ten integer operations a value), paid once per nonzero and token
// chunk. The one-token forward does little else: 4096x4096 at 50% took 15.5 ms in fp16 against 4.7 in bf16, whose
// conversion is a shift (AVX2 EPYC, 1 thread, benchmarks/results/sparse/cpu-backends-halfprec-avx2-1t.json).
// half_block_to_f32 converts 8 values an instruction into a buffer that stays in L1.
#pragma once

#include "half_convert.h"
#include "simd.h"

#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <type_traits>
#include <vector>

namespace effikern {

template <typename S, typename A>
class WideValues {
 public:
  static constexpr bool kWidens = std::is_same_v<S, c10::Half>;

  // Makes values[j0, j1) readable through operator[] (until the next call).
  EK_INLINE void load(const S* values, int64_t j0, int64_t j1) {
    if constexpr (kWidens) {
      if (static_cast<int64_t>(buf_.size()) < j1 - j0) buf_.resize(j1 - j0);
      half_convert::half_block_to_f32(reinterpret_cast<const uint16_t*>(values + j0), buf_.data(), j1 - j0);
      j0_ = j0;
    } else {
      values_ = values;
    }
  }

  EK_INLINE A operator[](int64_t j) const {
    if constexpr (kWidens) {
      return buf_[j - j0_];
    } else {
      return static_cast<A>(values_[j]);
    }
  }

  // The loaded range as an array of A where it was widened (element 0 = values[j0]), else nullptr.
  const A* widened() const { return kWidens ? buf_.data() : nullptr; }

 private:
  const S* values_ = nullptr;
  std::vector<A> buf_;  // (A is float wherever it widens: fp16's opmath type)
  int64_t j0_ = 0;
};

// One stored value as A inside a kernel's run<B> (isa_dispatch.h), for values read one at a time where a WideValues
// buffer per short segment would not pay for itself. fp16 converts with F16C's vcvtph2ps in the AVX2 and AVX-512
// builds (B >= 32: isa::level() guarantees F16C there), where c10::Half's conversion would be software. Written as
// asm because GCC refuses the _cvtsh_ss intrinsic inside an always_inline template that is not itself compiled for
// F16C, even though it only ever runs inlined into run_avx2 / run_avx512.
template <int B, typename A, typename S>
EK_INLINE A widen_value(S v) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<S, c10::Half> && B >= 32) {
    __m128 wide;
    __asm__("vcvtph2ps %1, %0" : "=x"(wide) : "x"(_mm_cvtsi32_si128(v.x)));
    return _mm_cvtss_f32(wide);
  }
#endif
  return static_cast<A>(v);
}

// One value in the stored dtype S, inside a kernel's run<B>: fp16 rounds with F16C's vcvtps2ph (to nearest even,
// as c10::Half does) in the AVX2 and AVX-512 builds, for the same reason as widen_value.
template <int B, typename S, typename A>
EK_INLINE S narrow_value(A v) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<S, c10::Half> && B >= 32) {
    __m128i half;
    __asm__("vcvtps2ph $0, %1, %0" : "=x"(half) : "x"(_mm_set_ss(v)));
    return c10::Half(static_cast<uint16_t>(_mm_cvtsi128_si32(half)), c10::Half::from_bits());
  }
#endif
  return static_cast<S>(v);
}

// dst[i] = src[i] in the stored dtype S for i < n (outside the ISA kernels): fp16 a block at a time through
// half_convert (F16C where the CPU has it), not c10::Half's per-value software conversion (~3 ms of the 1.68M-entry
// fp16 value gradient, 4096 x 4096 at 90%, on the AVX2 EPYC).
template <typename S, typename A>
void narrow_block(const A* src, S* dst, int64_t n) {
  if constexpr (std::is_same_v<S, c10::Half> && std::is_same_v<A, float>) {
    half_convert::f32_block_to_half(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
  }
}

}  // namespace effikern
