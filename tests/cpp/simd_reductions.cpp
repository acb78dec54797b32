// Checks the lane reductions of csrc/cpu/simd.h (sum, sum4, sum_lanes, lane<K>) for every vector width the kernels
// use, against plain loops. Run by tests/test_cpu_simd.py, compiled once for the host's baseline (where GCC lowers
// 32- and 64-byte vectors to narrower code, so the AVX-512 shuffle patterns are checked on any x86 machine) and once
// per wider ISA the host has. Inputs are small integers, so every order of summation gives the exact same sum.
// Prints one line per failure and exits 1 if there was any.
#include "simd.h"

#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

template <typename T>
void expect(const char* what, int width, int64_t i, T got, T want) {
  if (got != want) {
    std::printf("%s<%s, %d> lane %lld: got %g, want %g\n", what, sizeof(T) == 4 ? "float" : "double", width,
                static_cast<long long>(i), static_cast<double>(got), static_cast<double>(want));
    ++failures;
  }
}

template <typename T, int B, int64_t K = 0>
void check_lane(typename effikern::Simd<T, B>::V v) {
  using W = effikern::Simd<T, B>;
  if constexpr (K < W::kLanes) {
    const typename W::V b = W::template lane<K>(v);
    for (int64_t i = 0; i < W::kLanes; ++i) expect("lane", B, i, b[i], v[K]);
    check_lane<T, B, K + 1>(v);
  }
}

template <typename T, int B>
void check_width(unsigned seed) {
  using W = effikern::Simd<T, B>;
  constexpr int64_t L = W::kLanes;
  std::srand(seed);
  typename W::V s[L];
  T want[L];
  for (int64_t r = 0; r < L; ++r) {
    want[r] = 0;
    for (int64_t i = 0; i < L; ++i) {
      // distinct small integers per (vector, lane): a lane read from the wrong place changes the sum
      s[r][i] = static_cast<T>(std::rand() % 1000 - 500) + static_cast<T>(r * 4096 + i * 64);
      want[r] += s[r][i];
    }
  }
  const typename W::V all = W::sum_lanes(s);
  for (int64_t r = 0; r < L; ++r) expect("sum_lanes", B, r, all[r], want[r]);
  for (int64_t r = 0; r < L; ++r) expect("sum", B, r, W::sum(s[r]), want[r]);
  if constexpr (L >= 4) {
    T four[4];
    W::sum4(s[0], s[1], s[2], s[3], four);
    for (int r = 0; r < 4; ++r) expect("sum4", B, r, four[r], want[r]);
  }
  check_lane<T, B>(s[L - 1]);
}

}  // namespace

int main() {
  for (unsigned seed = 1; seed <= 20; ++seed) {
    check_width<float, 16>(seed);
    check_width<float, 32>(seed);
    check_width<float, 64>(seed);
    check_width<double, 16>(seed);
    check_width<double, 32>(seed);
    check_width<double, 64>(seed);
  }
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
