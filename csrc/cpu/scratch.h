// Scratch memory for the C++ kernels: uninitialized (every kernel writes it before reading it; std::vector would
// zero it first) and aligned to a cache line. malloc returns 16-byte aligned blocks (large ones at page + 16), so
// every 64-byte vector of a channels-last row or of a packed sparse operand straddled two cache lines (in a
// microbenchmark of the sparse forward's 16-token loop, Zen 4: 2.4 -> 4.5 cycles per nonzero with the packed operand
// 16 bytes off a cache line).
//
// Large blocks are kept for the next call instead of freed (scratch_cache.cpp). glibc hands large freed blocks back
// to the kernel (munmap, or trimming the heap), so the next call of the same kernel took a page fault per 4 KiB
// and had the kernel zero every page again. Measured (perf, 1 thread, one 384x14x14 image, 7x7 -> 1536, fp32
// channels_last backward): 43% of the samples were in the kernel, page faults and munmap, against 34% in the
// GEMMs; the 2.4 MB weight-gradient partials and tile buffers were refetched from the kernel on every call.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

namespace effikern {

constexpr std::size_t kScratchAlign = 64;

namespace scratch_cache {
// Blocks of at least this many bytes go through the cache; smaller ones are plain aligned new/delete.
constexpr std::size_t kMinCachedBytes = std::size_t{256} << 10;
// At most this many bytes are held in freed blocks, process-wide; a block that would exceed it is freed.
constexpr std::size_t kMaxHeldBytes = std::size_t{64} << 20;

struct Block {
  void* data;
  std::size_t bytes;  // its real size, at least what was asked for
};
// A block of at least `bytes`, 64-byte aligned: a kept one of at most 2 * bytes, or a new one. Thread-safe.
Block take(std::size_t bytes);
// Gives back a block from take (its real size): kept while the cache would hold at most kMaxHeldBytes, else freed.
void give(Block block);
// Frees every kept block (tests, and callers that want the memory back).
void release_all();
// Bytes held in kept blocks now.
std::size_t held_bytes();
}  // namespace scratch_cache

struct ScratchDelete {
  std::size_t bytes = 0;  // the block's real size
  void operator()(void* p) const { scratch_cache::give({p, bytes}); }
};

template <typename T>
using Scratch = std::unique_ptr<T[], ScratchDelete>;

// n elements of T (at least one), 64-byte aligned, not initialized.
template <typename T>
Scratch<T> scratch(int64_t n) {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>);
  const scratch_cache::Block block =
      scratch_cache::take(static_cast<std::size_t>(std::max<int64_t>(n, 1)) * sizeof(T));
  return Scratch<T>(static_cast<T*>(block.data), ScratchDelete{block.bytes});
}

}  // namespace effikern
