// scale_rows_cpu.h: rows in parallel, each in blocks of kBlock elements through a float32 buffer on the stack.
#include "scale_rows_cpu.h"

#include "half_convert.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace effikern {
namespace {

constexpr int64_t kBlock = 1024;

// bfloat16 blocks with half_convert.h's scalar conversions, in loops GCC vectorizes at -O3.
void bf16_block_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_convert::bf16_to_f32(src[i]);
}

void f32_block_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_convert::f32_to_bf16(src[i]);
}

template <bool kBf16>
void scale_row(const uint16_t* g, float s, uint16_t* o, int64_t n) {
  alignas(64) float buf[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t k = std::min(kBlock, n - b);
    kBf16 ? bf16_block_to_f32(g + b, buf, k) : half_convert::half_block_to_f32(g + b, buf, k);
    for (int64_t i = 0; i < k; ++i) buf[i] *= s;
    kBf16 ? f32_block_to_bf16(buf, o + b, k) : half_convert::f32_block_to_half(buf, o + b, k);
  }
}

}  // namespace

void scale_rows_cpu(const at::Tensor& scale, const at::Tensor& grad, const at::Tensor& out) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && out.is_contiguous() && out.sizes() == grad.sizes() &&
                  out.scalar_type() == grad.scalar_type(),
              "scale_rows_cpu: grad and out must be contiguous [rows, V] tensors of one dtype");
  TORCH_CHECK(grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16,
              "scale_rows_cpu: grad must be float16 or bfloat16, got ", grad.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == grad.size(0),
              "scale_rows_cpu: scale must be a contiguous float32 tensor of grad.size(0) elements");
  const int64_t rows = grad.size(0), V = grad.size(1);
  if (rows == 0 || V == 0) return;
  const auto* g = static_cast<const uint16_t*>(grad.data_ptr());
  auto* o = static_cast<uint16_t*>(out.data_ptr());
  const float* s = scale.data_ptr<float>();
  const bool bf16 = grad.scalar_type() == at::kBFloat16;
  // Rows per task: at least ~64K elements, so small V still amortizes the fork.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / V);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bf16 ? scale_row<true>(g + r * V, s[r], o + r * V, V) : scale_row<false>(g + r * V, s[r], o + r * V, V);
    }
  });
}

}  // namespace effikern
