// Torch entry points of the sparse-weight matmul CUDA kernels (sparse_kernels.cu), bound in csrc/bindings.cpp.
// Array conventions: docs/sparse_kernels.md. W is [N, K]; every index tensor is int32; values,
// bias and activations share one dtype (float32, float16 or bfloat16); results come back in it, accumulated
// in fp32. `stream` is torch's current CUDA stream of the inputs' device as an integer
// (torch.cuda.current_stream().cuda_stream), and that device must be current: the op layer arranges both.
#pragma once

#include <torch/extension.h>

namespace effikern {

/// y [M, N] = x [M, K] @ W^T (+ bias [N]); W in CSR: crow [N + 1], col [nnz], values [nnz].
/// Built for few tokens (M <= 64), correct for any M.
at::Tensor sparse_csr_fwd_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                               int64_t stream);

/// gx [M, K] = gy [M, N] @ W through the CSC view: t_crow [K + 1], t_row [nnz], t_perm [nnz].
at::Tensor sparse_csr_grad_input_cuda(const at::Tensor& gy, const at::Tensor& t_crow, const at::Tensor& t_row,
                                      const at::Tensor& t_perm, const at::Tensor& values, int64_t N, int64_t K,
                                      int64_t stream);

/// g [nnz]: g[e] = gy[:, row[e]] . x[:, col[e]], in x's dtype.
at::Tensor sparse_csr_grad_values_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& row,
                                       const at::Tensor& col, int64_t stream);

/// y [M, N] = x [M, K] @ W^T (+ bias [N]); W in BSR: crow [ceil(N/BR) + 1], col [nnzb], values [nnzb, BR, BC].
at::Tensor sparse_bsr_fwd_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                               int64_t stream);

/// gx [M, K] = gy [M, N] @ W through the block-column view: t_crow [ceil(K/BC) + 1], t_row, t_perm [nnzb].
at::Tensor sparse_bsr_grad_input_cuda(const at::Tensor& gy, const at::Tensor& t_crow, const at::Tensor& t_row,
                                      const at::Tensor& t_perm, const at::Tensor& values, int64_t N, int64_t K,
                                      int64_t stream);

/// g [nnzb, BR, BC] = gy^T @ x at the stored blocks (padding rows/columns 0), in x's dtype;
/// values_shape = (nnzb, BR, BC).
at::Tensor sparse_bsr_grad_values_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& row,
                                       const at::Tensor& col, at::IntArrayRef values_shape, int64_t stream);

}  // namespace effikern
