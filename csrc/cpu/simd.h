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

  // The lane sums of kLanes vectors as one vector: lane i = sum(s[i]). Each level adds pairs of lanes of two
  // vectors into one, so kLanes reductions cost 2 (kLanes - 1) shuffles and kLanes - 1 adds, and the result goes
  // out in one vector store (sum4 + 4 scalar extracts and stores cost ~6 cycles per nonzero of the CSR value
  // gradient at 16 tokens on AVX2, mostly shuffles). For 4-byte lanes the first two levels stay inside each 16-byte
  // group (unpack-style shuffles, one cycle each) and only the last log2(kLanes / 4) levels move whole groups
  // across: shuffles that cross the 16-byte groups at lane granularity compiled to vpermd + blend pairs.
  static EK_INLINE V sum_lanes(const V (&s)[kLanes]) {
    constexpr auto lanes = std::make_integer_sequence<int64_t, kLanes>{};
    if constexpr (kLanes == 1) {
      return s[0];
    } else if constexpr (sizeof(T) == 4 && kLanes >= 4) {
      V q[kLanes / 4];
      for (int64_t r = 0; r < kLanes / 4; ++r) {
        q[r] = sum_quads(s[4 * r], s[4 * r + 1], s[4 * r + 2], s[4 * r + 3], lanes);
      }
      if constexpr (kLanes == 4) {
        return q[0];
      } else {
        return sum_level<kLanes / 2>(q, lanes);
      }
    } else {
      return sum_level<kLanes / 2>(s, lanes);
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

  // sum_lanes' level with output blocks of S lanes: output vector r, block b takes input vector 2r + (b >= kLanes/2S),
  // block b % (kLanes/2S) (2S lanes), and adds its two halves. The last level (N == 2 inputs) returns its vector.
  static constexpr int64_t level_lo(int64_t i, int64_t S) {
    const int64_t b = i / S, half_blocks = kLanes / (2 * S);
    return (b >= half_blocks ? kLanes : 0) + (b % half_blocks) * 2 * S + i % S;
  }
  template <int64_t S, size_t N, int64_t... I>
  static EK_INLINE V sum_level(const V (&in)[N], std::integer_sequence<int64_t, I...> lanes) {
    V out[N / 2];
    for (size_t r = 0; r < N / 2; ++r) {
      out[r] = __builtin_shufflevector(in[2 * r], in[2 * r + 1], level_lo(I, S)...) +
               __builtin_shufflevector(in[2 * r], in[2 * r + 1], (level_lo(I, S) + S)...);
    }
    if constexpr (N == 2) {
      return out[0];
    } else {
      return sum_level<S / 2>(out, lanes);
    }
  }

  // 4-byte lanes, within every 16-byte group g (lanes 4g .. 4g+3) of a, b, c, d: the group's partial sums
  // [a_g, b_g, c_g, d_g]. Step 1 pairs lanes k and k+2 of (a, b) as unpcklps/unpckhps do:
  // [a0+a2, b0+b2, a1+a3, b1+b3]; step 2 pairs the 8-byte halves of (ab, cd) as unpcklpd/unpckhpd do.
  static constexpr int64_t interleave_lo(int64_t i) { return (i % 2 ? kLanes : 0) + i / 4 * 4 + i % 4 / 2; }
  static constexpr int64_t halves_lo(int64_t i) { return (i % 4 >= 2 ? kLanes : 0) + i / 4 * 4 + i % 2; }
  template <int64_t... I>
  static EK_INLINE V sum_quads(V a, V b, V c, V d, std::integer_sequence<int64_t, I...>) {
    const V ab =
        __builtin_shufflevector(a, b, interleave_lo(I)...) + __builtin_shufflevector(a, b, (interleave_lo(I) + 2)...);
    const V cd =
        __builtin_shufflevector(c, d, interleave_lo(I)...) + __builtin_shufflevector(c, d, (interleave_lo(I) + 2)...);
    return __builtin_shufflevector(ab, cd, halves_lo(I)...) + __builtin_shufflevector(ab, cd, (halves_lo(I) + 2)...);
  }

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
