// Host launchers of the sparse-weight matmul CUDA kernels (sparse_kernels.cu): y = x W^T + b with a pruned
// weight W [N, K] stored as CSR (unstructured) or BSR (blocks), and the two products of its backward.
// Array conventions: docs/sparse_kernels.md (crow/col/row/values, the transposed view
// t_crow/t_row/t_perm). CSR is panelled: columns are cut into panels of 256, a row's entries into one segment
// per panel; pointers, segments and t_perm are int32, in-panel offsets (col, t_row) uint8. BSR indices are int32.
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

/// Columns per panel of the CSR format (PANEL in effikern/sparse/formats.py): an in-panel offset is one uint8.
constexpr int kCsrPanel = 256;

/// Panels covering `width` columns, at least 1 (n_panels in formats.py): the P of a CSR over `width` columns.
constexpr int64_t csr_panels(int64_t width) { return width > kCsrPanel ? (width + kCsrPanel - 1) / kCsrPanel : 1; }

/// Panelled compressed sparse product, one entry at a time, with P = ceil(in_features / 256) (at least 1):
///   out[m, o] = sum_{p < P} sum_{e in ptr[o*P + p] .. ptr[o*P + p + 1]} values[perm ? perm[e] : e]
///               * a[m, p*256 + idx[e]]  (+ bias[o])
/// Forward: ptr = crow [N*P + 1], idx = col, perm = nullptr, out = y [M, N] (in_features = K).
/// grad_input: the same over W^T, in_features = N (so P = Pn), out_features = K: ptr = t_crow [K*Pn + 1],
///   idx = t_row, perm = t_perm, out = gx [M, K], bias = nullptr.
///   a_t   activations TOKEN-MAJOR: a_t[i * M + m] ([in_features, M] contiguous; the glue transposes), so one
///         entry's gather of consecutive tokens reads consecutive addresses
///   out   [M, out_features] row-major (written, every element)
/// Pointers and perm are trusted (the op layer builds them); an offset that lands past in_features in the
/// last panel contributes nothing and is never read from outside a.
cudaError_t csr_mm(DType dtype, const void* a_t, int64_t M, int64_t in_features, const int32_t* ptr,
                   const uint8_t* idx, const int32_t* perm, const void* values, const void* bias,
                   int64_t out_features, void* out, cudaStream_t stream);

/// Sampled gradient of panelled CSR values, with P = ceil(in_features / 256) (at least 1) and s = row[e] the
/// SEGMENT of entry e: out[e] = sum_m gy[m, s / P] * x[m, (s % P)*256 + col[e]], e < nnz.
///   gy_t [out_features = N, M], x_t [in_features = K, M]: both token-major (contiguous over m)
/// An entry whose row or column falls outside [N, K] (never in a well-formed weight) gets 0.
cudaError_t csr_sddmm(DType dtype, const void* gy_t, const void* x_t, int64_t M, int64_t out_features,
                      int64_t in_features, const int32_t* row, const uint8_t* col, int64_t nnz, void* out,
                      cudaStream_t stream);

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
