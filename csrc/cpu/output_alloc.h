// Output tensors that a CPU kernel is about to write in full, allocated so that first touching them is cheap.
//
// Why. glibc serves allocations of 32 MiB and more (and, after heap trimming, many smaller ones) with fresh
// mmap'd memory, so every call of a kernel with a large output first takes one page fault per 4 KiB page and has
// the kernel zero it. Measured (perf, 2-core EPYC, 2 threads): the fp32 channels_last backward at
// 8 x 96 x 112 x 112 took 9,500 faults per call (all 37 MiB of grad_x), and the kernel's own fault handling was 44%
// of the samples; the fused compute was 12%. Advising the allocation for transparent huge pages (Linux
// madvise(MADV_HUGEPAGE), what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation) makes those faults 512x
// fewer.
//
// Only what the kernel writes in full, and only above kMinHugePageBytes: smaller allocations rarely span a whole
// aligned 2 MiB page. Elsewhere (not Linux, THP mode "never") the advice is a no-op. EFFIKERN_HUGE_PAGES=0 turns it
// off (read once).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace effikern {

constexpr int64_t kMinHugePageBytes = int64_t{4} << 20;

// Advises [data, data + bytes) for transparent huge pages (its 2 MiB-aligned interior), when bytes >=
// kMinHugePageBytes and the advice is enabled. Returns whether the advice was given.
bool advise_huge_pages(void* data, int64_t bytes);

// at::empty / at::empty_like, then advise_huge_pages on the storage. For outputs the caller writes in full.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty_output_like(const at::Tensor& like, c10::optional<at::MemoryFormat> format = c10::nullopt);

}  // namespace effikern
