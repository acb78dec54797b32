// Huge-page advice for large CPU outputs: see output_alloc.h.
#include "output_alloc.h"

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace effikern {
namespace {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("EFFIKERN_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

}  // namespace

bool advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (data == nullptr || bytes < kMinHugePageBytes || !huge_pages_enabled()) return false;
  // madvise needs a page-aligned start; only whole 2 MiB pages inside the range can become huge pages, and the
  // head and tail stay as they are so that no neighbouring allocation is touched.
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (end <= begin) return false;
  // A failure (an old kernel without THP: EINVAL) only costs the faults this would have saved.
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t.data_ptr(), static_cast<int64_t>(t.nbytes()));
  return t;
}

at::Tensor empty_output_like(const at::Tensor& like, c10::optional<at::MemoryFormat> format) {
  at::Tensor t = at::empty_like(like, like.options(), format);
  advise_huge_pages(t.data_ptr(), static_cast<int64_t>(t.nbytes()));
  return t;
}

}  // namespace effikern
