// Fused depthwise-separable convolution, C++ CPU backend (the `cpp` backend of torch.ops.effikern.dwsep_conv2d).
//
//   y = pw(act(dw(x) + dw_bias)) + pw_bias [+ residual]
//
// dw is the depthwise k_h x k_w convolution (groups = C), pw the 1x1 convolution C -> Cout. The depthwise result never
// reaches DRAM: each tile of output pixels is computed for all channels into a thread-local buffer and multiplied by
// the pointwise weight right away. The op layer (effikern/ops) validates every argument before these are called.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace effikern {

// Forward.
//   x:         [N, C, H, W], NCHW-contiguous or channels_last-contiguous; float64, float32, float16 or bfloat16.
//   dw_weight: [C, 1, kh, kw] contiguous.       dw_bias: [C] or None.
//   pw_weight: [Cout, C, 1, 1] contiguous.      pw_bias: [Cout] or None.
//   stride, padding, dilation: (h, w) pairs as in F.conv2d.  activation: 0 none, 1 relu, 2 relu6, 3 silu,
//   4 gelu (erf), 5 hardswish.  residual: [N, Cout, Ho, Wo] or None, any memory format.
// Returns y: [N, Cout, Ho, Wo] in x's dtype and memory format. All tensors share x's dtype; accumulation is fp32
// (fp64 for float64 inputs) and the result is rounded once, on store.
at::Tensor dwsep_fwd_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                         const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t activation, const c10::optional<at::Tensor>& residual);

// Backward. Recomputes z = dw(x) + dw_bias tile by tile (nothing from the forward is saved).
//   grad_y: [N, Cout, Ho, Wo], any memory format; the other arguments as in dwsep_fwd_cpu.
// Returns {grad_x [N, C, H, W] (x's memory format), grad_dw_weight [C, 1, kh, kw], grad_dw_bias [C],
//          grad_pw_weight [Cout, C, 1, 1], grad_pw_bias [Cout]}, all in x's dtype. Weight and bias gradients are
// summed per thread and reduced in a fixed order, so results are bitwise reproducible for a given thread count.
std::vector<at::Tensor> dwsep_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight,
                                      const c10::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t activation);

// How many channel slices dwsep_bwd_cpu would run x's backward as on `threads` threads (1: tile-parallel; see
// backward_channel_groups in dwsep_cpu.cpp). For tests, which must know which path they exercise.
int64_t dwsep_bwd_channel_groups_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t threads);

}  // namespace effikern
