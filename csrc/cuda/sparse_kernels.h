// Host launchers of the sparse-weight matmul CUDA kernels (sparse_kernels.cu): y = x W^T + b with a pruned
// weight W [N, K] stored as CSR (unstructured) or BSR (blocks), and the two products of its backward.
// Array conventions: docs/sparse_kernels.md (crow/col/row/values, the transposed view
// t_crow/t_row/t_perm); every index array is int32.
//
// The seam between the torch glue (sparse_cuda.cpp, host compiler) and the kernels (nvcc): no torch type, no
// CUDA header beyond cuda_runtime_api.h. Launchers take raw device pointers, enqueue on `stream`, return the
// first CUDA error (or cudaSuccess) and synchronise nothing. All arithmetic accumulates in fp32.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace effikern {
namespace cuda {
namespace sparse {

/// Element type of activations, values, bias and outputs (one dtype for all of them): dtype.h.
using ::effikern::cuda::DType;

/// Compressed sparse product, one entry at a time:
///   out[m, o] = sum_{e in ptr[o] .. ptr[o+1]} values[perm ? perm[e] : e] * a[m, idx[e]]  (+ bias[o])
/// Forward: ptr = crow [N+1], idx = col, perm = nullptr, out = y [M, N].
/// grad_input: ptr = t_crow [K+1], idx = t_row, perm = t_perm, out = gx [M, K], bias = nullptr.
///   a_t   activations TOKEN-MAJOR: a_t[i * M + m] ([in_features, M] contiguous; the glue transposes), so one
///         entry's gather of consecutive tokens reads consecutive addresses
///   out   [M, out_features] row-major (written, every element)
cudaError_t csr_mm(DType dtype, const void* a_t, int64_t M, int64_t in_features, const int32_t* ptr,
                   const int32_t* idx, const int32_t* perm, const void* values, const void* bias,
                   int64_t out_features, void* out, cudaStream_t stream);

/// Sampled gradient of CSR values: out[e] = sum_m gy[m, row[e]] * x[m, col[e]], e < nnz.
///   gy_t [N, M], x_t [K, M]: both token-major (contiguous over m)
cudaError_t csr_sddmm(DType dtype, const void* gy_t, const void* x_t, int64_t M, const int32_t* row,
                      const int32_t* col, int64_t nnz, void* out, cudaStream_t stream);

/// Block-sparse product over stored (rows x cols) blocks, values [nnzb, rows, cols] row-major:
///   out[m, ob*OB + o] = sum_{e in ptr[ob] .. ptr[ob+1]} sum_i a[m, idx[e]*IB + i] * B_e(i, o)  (+ bias)
/// Forward (transposed = false): IB = cols (BC), OB = rows (BR), B_e(i, o) = values[e][o][i]; ptr = crow,
///   idx = col, perm = nullptr.
/// grad_input (transposed = true): IB = rows (BR), OB = cols (BC), B_e(i, o) = values[perm[e]][i][o];
///   ptr = t_crow, idx = t_row, perm = t_perm, bias = nullptr.
///   a    [M, in_features] row-major; reads stop at in_features (the weight's zero padding is never read)
///   out  [M, out_features] row-major (written, every element); n_out_blocks = ceil(out_features / OB)
cudaError_t bsr_mm(DType dtype, const void* a, int64_t M, int64_t in_features, const int32_t* ptr,
                   const int32_t* idx, const int32_t* perm, const void* values, int rows, int cols, bool transposed,
                   const void* bias, int64_t out_features, void* out, cudaStream_t stream);

/// Sampled gradient of BSR blocks: out[b][r][c] = sum_m gy[m, row[b]*rows + r] * x[m, col[b]*cols + c];
/// entries past N or K (padding) are 0. gy [M, N], x [M, K] row-major; out [nnzb, rows, cols].
cudaError_t bsr_sddmm(DType dtype, const void* gy, const void* x, int64_t M, int64_t N, int64_t K,
                      const int32_t* row, const int32_t* col, int64_t nnzb, int rows, int cols, void* out,
                      cudaStream_t stream);

}  // namespace sparse
}  // namespace cuda
}  // namespace effikern
