// The stored weights of the CPU sparse kernels (csrc/cpu/sparse_cpu.cpp) read as their accumulation type, with
// fp16 weights widened a row (or a block) at a time by F16C instead of one value at a time.
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

}  // namespace effikern
