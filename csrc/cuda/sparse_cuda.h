// Torch entry points of the sparse-weight matmul CUDA kernels (sparse_kernels.cu), bound in csrc/bindings.cpp.
// Array conventions: docs/sparse_kernels.md. W is [N, K]. CSR is panelled (P = ceil(K/256), Pn = ceil(N/256),
// each at least 1): pointers, segments and t_perm are int32, in-panel offsets (col, t_row) uint8; every BSR
// index is int32. Values, bias and activations share one dtype (float32, float16 or bfloat16); results come
// back in it, accumulated in fp32. `stream` is torch's current CUDA stream of the inputs' device as an integer
// (torch.cuda.current_stream().cuda_stream), and that device must be current: the op layer arranges both.
#pragma once

#include <torch/extension.h>

namespace effikern {

/// y [M, N] = x [M, K] @ W^T (+ bias [N]); W in panelled CSR: crow [N*P + 1] int32, col [nnz] uint8 (column
/// minus 256 * panel), values [nnz].
/// Built for few tokens (M <= 64), correct for any M.
at::Tensor sparse_csr_fwd_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                               int64_t stream);

/// gx [M, K] = gy [M, N] @ W through the transposed view: t_crow [K*Pn + 1] int32, t_row [nnz] uint8 (row minus
/// 256 * row panel), t_perm [nnz] int32.
at::Tensor sparse_csr_grad_input_cuda(const at::Tensor& gy, const at::Tensor& t_crow, const at::Tensor& t_row,
                                      const at::Tensor& t_perm, const at::Tensor& values, int64_t N, int64_t K,
                                      int64_t stream);

/// g [nnz]: g[e] = gy[:, s / P] . x[:, (s % P)*256 + col[e]] with s = row[e] (int32, the entry's segment),
/// col uint8, P from x's width K; in x's dtype.
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
