// Portable SIMD for the C++ kernels: GCC/Clang vector types of B bytes (B = 16, 32 or 64, chosen per ISA by
// isa_dispatch.h), so one kernel source compiles to SSE2/NEON, AVX2 and AVX-512 code.
#pragma once

#include <cstdint>
#include <cstring>

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
};

}  // namespace effikern
