// One output row of the panelled CSR weight (csrc/cpu/sparse_cpu.cpp) as absolute input columns, for the forward's
// flat walk (both its gather and packed paths; where it is used: flat_walk() there): row o's entries
// crow[o*P] .. crow[(o+1)*P] become columns[0 .. n).
//
// Why: the stored row is P short segments (one per 256-column panel, 1-byte offsets). Walked segment by segment,
// the loop pays every segment's loop exit and remainder, branches whose trip counts are random (about 26 entries
// per segment at 90% sparsity); the one-token forward ran at ~2 cycles per nonzero. The same multiply-adds over a flat
// array of columns run at ~1.05 (microbenchmark: 4096 x 4096, 90%, 1 thread, AVX2 Zen 3 EPYC: 1.34 vs 0.72 ms).
// Expanding the offsets costs ~0.25 cycles per nonzero: 16 at a time, one widening and one add of the panel's base,
// stored over the segment's end (the next segment overwrites the excess). Expand + flat loop: 0.88 ms.
//
// Columns are uint16 (fits(R): R <= 65536). uint16 also keeps GCC from turning the flat loop into AVX2 gathers,
// which it does for int32 indices and which run at ~2 cycles per nonzero on this CPU.
#pragma once

#include "simd.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace effikern {

template <int64_t kPanel>
class RowColumns {
 public:
  static constexpr int64_t kStep = 16;  // offsets widened per vector operation

  static bool fits(int64_t R) { return R <= 65536; }

  // stored: how many offsets idx holds (crow[O*P]). expand() reads up to kStep - 1 past a segment's end, never
  // past the array.
  explicit RowColumns(int64_t stored) : vector_end_(stored - kStep) {}

  // crow: [O*P + 1] segment pointers. Returns row o's n = crow[(o+1)*P] - crow[o*P] columns, valid until the next
  // call.
  EK_INLINE const uint16_t* expand(const int32_t* crow, const uint8_t* idx, int64_t o, int64_t P) {
    typedef uint8_t Offsets __attribute__((vector_size(kStep)));
    typedef uint16_t Columns __attribute__((vector_size(2 * kStep)));
    const int64_t j0 = crow[o * P], n = crow[(o + 1) * P] - j0;
    if (static_cast<int64_t>(columns_.size()) < n + kStep) columns_.resize(n + kStep);
    uint16_t* out = columns_.data();
    for (int64_t p = 0; p < P; ++p) {
      const uint16_t base = static_cast<uint16_t>(p * kPanel);
      const int64_t j1 = crow[o * P + p + 1];
      int64_t j = crow[o * P + p];
      for (; j < j1 && j <= vector_end_; j += kStep) {
        Offsets b;
        std::memcpy(&b, idx + j, kStep);
        const Columns c = __builtin_convertvector(b, Columns) + base;
        std::memcpy(out + (j - j0), &c, sizeof(c));
      }
      for (; j < j1; ++j) out[j - j0] = static_cast<uint16_t>(base + idx[j]);
    }
    return out;
  }

 private:
  std::vector<uint16_t> columns_;
  int64_t vector_end_;  // the last j with kStep offsets readable from idx + j
};

}  // namespace effikern
