// Masked sparse matmul kernels on the CPU (issue #4): y = x W^T + b with W held as CSR (unstructured) or BSR
// (block), and the two gradients that fine-tuning needs. The array layout is the kernel interface shared by every
// backend (docs/sparse_kernels.md): index arrays contiguous (int32, except the uint8 column/row offsets of the
// panelled CSR), values in the parameter's dtype, accumulation in fp32 (fp64 for fp64). Arguments are validated by
// the op layer (effikern/ops/sparse.py), not here. Supported dtypes: float32, bfloat16, float16, float64.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace effikern {

// Panelled CSR, W [N, K], P = ceil(K/256): crow [N*P+1] int32 segment pointers (segment s = row*P + panel), col
// [nnz] uint8 offsets within the panel, values [nnz]. x [M, K] -> y [M, N] (x's dtype); bias [N] or none.
at::Tensor sparse_csr_fwd_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t N, int64_t K);

// The CSR gradients are computed from the forward arrays alone (no transposed view, no per-entry row index: the
// GPU backends' interface keeps those, the CPU kernels walk rows and panels instead).
// grad_x [M, K] = gy [M, N] W, scattered per column panel.
at::Tensor sparse_csr_grad_input_rowwise_cpu(const at::Tensor& gy, const at::Tensor& crow, const at::Tensor& col,
                                             const at::Tensor& values, int64_t N, int64_t K);

// grad_values [nnz] (gy's dtype): entry j of segment o*P + p is gy[:, o] . x[:, p*256 + col[j]] (a sampled
// dense-dense product).
at::Tensor sparse_csr_grad_values_rowwise_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& crow,
                                              const at::Tensor& col);

// BSR, blocks (BR, BC), W zero-padded to [Np, Kp]: crow [Np/BR + 1], col [nnzb], values [nnzb, BR, BC].
at::Tensor sparse_bsr_fwd_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t N, int64_t K);

// grad_x [M, K] = gy [M, N] W through the block-column view t_crow [Kp/BC + 1], t_row, t_perm [nnzb].
at::Tensor sparse_bsr_grad_input_cpu(const at::Tensor& gy, const at::Tensor& t_crow, const at::Tensor& t_row,
                                     const at::Tensor& t_perm, const at::Tensor& values, int64_t N, int64_t K);

// grad_values [nnzb, BR, BC] (values_shape): the dense gradient gy^T x restricted to the stored blocks.
at::Tensor sparse_bsr_grad_values_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& row,
                                      const at::Tensor& col, at::IntArrayRef values_shape);

}  // namespace effikern
