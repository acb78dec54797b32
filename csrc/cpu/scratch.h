// Scratch memory for the C++ kernels: uninitialized (every kernel writes it before reading it; std::vector would
// zero it first) and aligned to a cache line. malloc returns 16-byte aligned blocks (large ones at page + 16), so
// every 64-byte vector of a channels-last row or of a packed sparse operand straddled two cache lines (in a
// microbenchmark of the sparse forward's 16-token loop, Zen 4: 2.4 -> 4.5 cycles per nonzero with the packed operand
// 16 bytes off a cache line).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>

namespace effikern {

constexpr std::size_t kScratchAlign = 64;

struct AlignedDelete {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t(kScratchAlign)); }
};

template <typename T>
using Scratch = std::unique_ptr<T[], AlignedDelete>;

// n elements of T (at least one), 64-byte aligned, not initialized.
template <typename T>
Scratch<T> scratch(int64_t n) {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>);
  void* p = ::operator new[](static_cast<std::size_t>(std::max<int64_t>(n, 1)) * sizeof(T),
                             std::align_val_t(kScratchAlign));
  return Scratch<T>(static_cast<T*>(p));
}

}  // namespace effikern
