// Host launchers of the fused depthwise-separable convolution CUDA kernels (dwsep_kernels.cu).
//
//     y = pw(act(dw(x) + dw_bias)) + pw_bias [+ residual]
//
// This header is the seam between the torch glue (dwsep_cuda.cpp, compiled by the host compiler) and the
// kernels (compiled by nvcc). It names no torch type and no CUDA header beyond cuda_runtime_api.h, so both
// sides compile against the CPU torch wheel on CI, which lacks the c10/cuda and ATen/cuda build headers.
//
// Every launcher takes raw device pointers, enqueues its work on `stream` and returns the first CUDA error
// (cudaGetLastError after each launch), or cudaSuccess. Nothing is synchronised. Tensors are described by
// element strides, so one kernel serves NCHW and channels_last.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace effikern {
namespace cuda {

// DType (dtype.h): the element type of x, y, residual, grad_y and grad_x; the kernels accumulate in fp32.

/// Element strides of a logical [N, C, H, W] tensor (NCHW: (C*H*W, H*W, W, 1); channels_last: (H*W*C, 1, W*C, C)).
struct Strides4 {
  int64_t n, c, h, w;
};

/// Problem geometry shared by the forward and backward launchers.
/// x: [N, C, H, W]; dw weight [C, 1, kh, kw]; pw weight [Cout, C, 1, 1]; y: [N, Cout, Ho, Wo] with
/// Ho = (H + 2*ph - dh*(kh-1) - 1) / sh + 1 and likewise Wo. All sizes >= 1, stride/dilation >= 1, padding >= 0.
struct DwsepGeometry {
  int N, C, H, W;
  int Cout, Ho, Wo;
  int kh, kw;
  int sh, sw;    // stride
  int ph, pw;    // symmetric zero padding
  int dh, dw;    // dilation
  Strides4 x;    // strides of x; grad_x is written with the same strides
  Strides4 y;    // strides of y (forward output) / grad_y (backward input)
};

/// Forward: y = pw(act(dw(x) + dw_b)) + pw_b [+ residual], all in one kernel.
///   x        [N, C, H, W] of `dtype`, strides g.x
///   dw_w     fp32 [C, kh*kw] (row-major)
///   dw_b     fp32 [C] or nullptr (zeros)
///   pw_wT    fp32 [C, Cout]: the pointwise weight TRANSPOSED (C-major), so a C-chunk of it is contiguous
///   pw_b     fp32 [Cout] or nullptr
///   residual [N, Cout, Ho, Wo] of `dtype` with strides res_strides, or nullptr
///   y        [N, Cout, Ho, Wo] of `dtype`, strides g.y (written)
///   activation: 0 none, 1 relu, 2 relu6, 3 silu, 4 gelu (erf), 5 hardswish
cudaError_t dwsep_forward(const DwsepGeometry& g, DType dtype, const void* x, const float* dw_w, const float* dw_b,
                          const float* pw_wT, const float* pw_b, const void* residual, Strides4 res_strides,
                          void* y, int activation, cudaStream_t stream);

/// Backward: recomputes z = dw(x) + dw_b and writes every gradient.
///   grad_y    [N, Cout, Ho, Wo] of `dtype`, strides g.y
///   x, dw_w, dw_b as in dwsep_forward; pw_w fp32 [Cout, C] (row-major, NOT transposed)
///   grad_z    fp32 scratch [N, C, Ho, Wo] with strides gz_strides (pick x's memory format: the grad_x
///             gather then reads it coalesced); fully overwritten
///   grad_x    [N, C, H, W] of `dtype`, strides g.x (written)
///   grad_dw_w fp32 [C, kh*kw], grad_dw_b fp32 [C], grad_pw_w fp32 [Cout, C], grad_pw_b fp32 [Cout]:
///             zeroed here, then accumulated with atomics (summation order is not deterministic)
cudaError_t dwsep_backward(const DwsepGeometry& g, DType dtype, const void* grad_y, const void* x, const float* dw_w,
                           const float* dw_b, const float* pw_w, int activation, float* grad_z, Strides4 gz_strides,
                           void* grad_x, float* grad_dw_w, float* grad_dw_b, float* grad_pw_w, float* grad_pw_b,
                           cudaStream_t stream);

/// dst (fp32) = src (`dtype`) for a row-major [rows, cols] matrix; with transpose, dst is [cols, rows].
cudaError_t convert_to_f32(const void* src, DType dtype, float* dst, int64_t rows, int64_t cols, bool transpose,
                           cudaStream_t stream);

/// dst (`dtype`) = src (fp32), `count` contiguous elements, round to nearest even.
cudaError_t convert_from_f32(const float* src, void* dst, DType dtype, int64_t count, cudaStream_t stream);

}  // namespace cuda
}  // namespace effikern
