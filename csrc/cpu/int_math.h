// Integer helpers shared by the C++ CPU kernels.
#pragma once

#include <cstdint>

namespace effikern {

// ceil(a / b) for b > 0, and 0 for a <= 0 (dwsep's column bounds pass padding offsets that may be negative).
constexpr int64_t ceil_div(int64_t a, int64_t b) { return a > 0 ? (a + b - 1) / b : 0; }

// a rounded up to a multiple of b (b > 0, a >= 0).
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace effikern
