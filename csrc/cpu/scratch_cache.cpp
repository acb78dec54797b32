// The process-wide cache of large scratch blocks (scratch.h says why it exists).
#include "scratch.h"

#include <map>
#include <mutex>
#include <new>

namespace effikern {
namespace scratch_cache {
namespace {

// Sizes of cached blocks are rounded up to this, so that calls of one kernel on slightly different shapes share them.
constexpr std::size_t kGranule = std::size_t{64} << 10;

struct Cache {
  std::mutex mutex;
  std::multimap<std::size_t, void*> kept;  // by size
  std::size_t held = 0;
};

// Never destroyed: a thread may give a block back while the process exits.
Cache& cache() {
  static Cache* instance = new Cache;
  return *instance;
}

void* allocate(std::size_t bytes) { return ::operator new[](bytes, std::align_val_t(kScratchAlign)); }

void deallocate(void* p) { ::operator delete[](p, std::align_val_t(kScratchAlign)); }

}  // namespace

Block take(std::size_t bytes) {
  if (bytes < kMinCachedBytes) return {allocate(bytes), bytes};
  bytes = (bytes + kGranule - 1) / kGranule * kGranule;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    // The smallest kept block that fits, unless it is more than twice the request (it would sit mostly unused
    // while a later, larger request allocates afresh).
    const auto it = c.kept.lower_bound(bytes);
    if (it != c.kept.end() && it->first <= 2 * bytes) {
      const Block block{it->second, it->first};
      c.held -= block.bytes;
      c.kept.erase(it);
      return block;
    }
  }
  return {allocate(bytes), bytes};
}

void give(Block block) {
  if (block.data == nullptr) return;
  if (block.bytes >= kMinCachedBytes) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.held + block.bytes <= kMaxHeldBytes) {
      c.kept.emplace(block.bytes, block.data);
      c.held += block.bytes;
      return;
    }
  }
  deallocate(block.data);
}

void release_all() {
  Cache& c = cache();
  std::multimap<std::size_t, void*> kept;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    kept.swap(c.kept);
    c.held = 0;
  }
  for (const auto& entry : kept) deallocate(entry.second);
}

std::size_t held_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.held;
}

}  // namespace scratch_cache
}  // namespace effikern
