// Portable SIMD for the C++ kernels: GCC/Clang vector types of B bytes (B = 16, 32 or 64, chosen per ISA by
// isa_dispatch.h), so one kernel source compiles to SSE2/NEON, AVX2 and AVX-512 code.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

// Everything a kernel's run<B> calls on vectors must be inlined into it to be compiled for that ISA's target.
#define EK_INLINE inline __attribute__((always_inline))

namespace effikern {

template <typename T, int B>
struct Simd {
  typedef T V __attribute__((vector_size(B)));
  static constexpr int64_t kLanes = B / sizeof(T);
  static EK_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static EK_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static EK_INLINE V splat(T x) { return V{} + x; }
  // The lane sums of four vectors, out[0..3]. Each halving level adds the halves of two vectors into one vector,
  // so the four reductions share their shuffles: 8 shuffles and 5 adds for four 16-lane sums, against 4 x (4
  // extracts + 4 adds) for four sum() calls (the CSR value gradient reduces one vector per nonzero).
  static EK_INLINE void sum4(V a, V b, V c, V d, T* out) {
    if constexpr (kLanes < 4) {
      out[0] = sum(a), out[1] = sum(b), out[2] = sum(c), out[3] = sum(d);
    } else {
      sum4_lanes(a, b, c, d, out, std::make_integer_sequence<int64_t, kLanes>{});
    }
  }

  // Lane K of v in every lane (a register shuffle, no load).
  template <int64_t K>
  static EK_INLINE V lane(V v) {
    return lane_impl<K>(v, std::make_integer_sequence<int64_t, kLanes>{});
  }

  // Horizontal sum by halving: log2(lanes) vector adds, not a lane-by-lane scalar chain (20+ cycles at 16 lanes,
  // paid per tap and channel in the planar weight gradient).
  static EK_INLINE T sum(V v) {
    if constexpr (B > 16) {
      using H = Simd<T, B / 2>;
      typename H::V lo, hi;
      std::memcpy(&lo, &v, B / 2);
      std::memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
      return H::sum(lo + hi);
    } else {
      T s = 0;
      for (int64_t i = 0; i < kLanes; ++i) s += v[i];
      return s;
    }
  }

 private:
  template <int64_t K, int64_t... I>
  static EK_INLINE V lane_impl(V v, std::integer_sequence<int64_t, I...>) {
    return __builtin_shufflevector(v, v, ((void)I, K)...);
  }

  static constexpr int64_t kHalf = kLanes / 2, kQuarter = kLanes / 4;
  // Level 1, lane i of [x.lo + x.hi | y.lo + y.hi] (from shuffle(x, y)): its two addends.
  static constexpr int64_t pair_lo(int64_t i) { return i < kHalf ? i : kLanes + i - kHalf; }
  static constexpr int64_t pair_hi(int64_t i) { return pair_lo(i) + kHalf; }
  // Level 2, from [x1 | y1] and [z1 | w1] (halves) to [x2 | y2 | z2 | w2] (quarters).
  static constexpr int64_t quad_lo(int64_t i) {
    return (i / kQuarter < 2 ? 0 : kLanes) + (i / kQuarter % 2) * kHalf + i % kQuarter;
  }
  static constexpr int64_t quad_hi(int64_t i) { return quad_lo(i) + kQuarter; }
  // Then halving inside each quarter: lane i's partner at distance s within its block of 2s lanes.
  template <int64_t S>
  static constexpr int64_t partner(int64_t i) { return i % (2 * S) < S ? i + S : i - S; }

  template <int64_t... I>
  static EK_INLINE void sum4_lanes(V a, V b, V c, V d, T* out, std::integer_sequence<int64_t, I...>) {
    const V ab = __builtin_shufflevector(a, b, pair_lo(I)...) + __builtin_shufflevector(a, b, pair_hi(I)...);
    const V cd = __builtin_shufflevector(c, d, pair_lo(I)...) + __builtin_shufflevector(c, d, pair_hi(I)...);
    V v = __builtin_shufflevector(ab, cd, quad_lo(I)...) + __builtin_shufflevector(ab, cd, quad_hi(I)...);
    static_assert(kQuarter <= 4, "sum4 halves quarters of at most 4 lanes (64-byte vectors of 4-byte lanes)");
    if constexpr (kQuarter >= 4) v += __builtin_shufflevector(v, v, partner<2>(I)...);
    if constexpr (kQuarter >= 2) v += __builtin_shufflevector(v, v, partner<1>(I)...);
    for (int k = 0; k < 4; ++k) out[k] = v[k * kQuarter];
  }
};

}  // namespace effikern
