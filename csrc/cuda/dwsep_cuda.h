// Torch entry points of the CUDA dwsep kernels (dwsep_cuda.cpp), bound in csrc/bindings.cpp.
//
// The op layer (effikern/ops/dwsep.py) validates every argument first, sets the current device to x's and
// passes `stream`, the raw cudaStream_t of torch's current stream on that device, as an integer. Taking it
// from Python keeps this code free of c10/cuda headers, so it compiles against the CPU torch wheel on CI.
// The stream must be torch's current stream: outputs are allocated by torch's caching allocator, which
// orders reuse on that stream.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace effikern {

/// y = pw(act(dw(x) + dw_bias)) + pw_bias [+ residual], one fused kernel.
/// x [N, C, H, W] (NCHW or channels_last) of float32/float16/bfloat16; dw_weight [C, 1, kh, kw];
/// dw_bias [C] or None; pw_weight [Cout, C, 1, 1]; pw_bias [Cout] or None; residual [N, Cout, Ho, Wo] or
/// None; activation code 0..5 (none, relu, relu6, silu, gelu, hardswish).
/// Returns y [N, Cout, Ho, Wo] in x's dtype and memory format.
at::Tensor dwsep_fwd_cuda(const at::Tensor& x, const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                          const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t activation, const c10::optional<at::Tensor>& residual, int64_t stream);

/// Gradients of dwsep_fwd_cuda (without residual) given grad_y [N, Cout, Ho, Wo]; recomputes dw(x).
/// Returns {grad_x [N, C, H, W] (x's memory format), grad_dw_weight [C, 1, kh, kw], grad_dw_bias [C],
/// grad_pw_weight [Cout, C, 1, 1], grad_pw_bias [Cout]}, all in x's dtype, accumulated in fp32.
std::vector<at::Tensor> dwsep_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight,
                                       const c10::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t activation, int64_t stream);

}  // namespace effikern
