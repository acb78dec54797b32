// Torch entry points of the fused GradScaler / optimizer CUDA kernels (amp_cuda.cpp), bound in csrc/bindings.cpp.
// Semantics: docs/amp_kernels.md (issue #5), the same for every backend.
//
// As for dwsep (dwsep_cuda.h): the op layer (effikern/ops/amp.py) validates the arguments, makes the tensors'
// device current and passes `stream`, the raw cudaStream_t of torch's current stream on that device, as an
// integer (torch.cuda.current_stream().cuda_stream). Taking it from Python keeps this code free of c10/cuda
// headers, so it compiles against the CPU torch wheel on CI. Everything is enqueued on that stream; nothing
// reads a device value on the host.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace effikern {

/// grads: contiguous CUDA tensors (float32/float16/bfloat16, mixed allowed, any numel incl. 0);
/// inv_scale, found_inf: 1-element float32. Sets found_inf to 1.0 if any element is inf/nan (never resets it);
/// with write_back, grads[i] *= inv_scale in place. norm_type: 2.0, inf, or 0.0 (no norm).
/// Returns a new 0-dim float32 tensor: the total norm of grad * inv_scale (0.0 for norm_type 0).
at::Tensor amp_unscale_check_norm_cuda(const std::vector<at::Tensor>& grads, const at::Tensor& inv_scale,
                                       const at::Tensor& found_inf, double norm_type, bool write_back,
                                       int64_t stream);

/// torch.optim.AdamW's update over equal-length lists (element i of each: same shape and dtype, contiguous).
/// step: 1-element float32 step count before the update, incremented on the device unless skipped;
/// grad_factor: None or 1-element float32 multiplier of the grads; found_inf: None or 1-element float32,
/// nonzero -> nothing changes. lr_tensor: None, or a 1-element float32/float64 tensor on the params' device
/// whose value, read by the kernels at run time, replaces lr (a CUDA graph replays its current value).
void amp_fused_adamw_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                          const at::Tensor& step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_factor,
                          const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor,
                          int64_t stream);

/// torch.optim.SGD's update. momentum_buffers: empty when momentum == 0, else one per param; step == 0 means
/// the buffers are uninitialised (set to the gradient). Other arguments as amp_fused_adamw_cuda.
void amp_fused_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& momentum_buffers, const at::Tensor& step, double lr,
                        double momentum, double dampening, bool nesterov, double weight_decay, bool maximize,
                        const c10::optional<at::Tensor>& grad_factor, const c10::optional<at::Tensor>& found_inf,
                        const c10::optional<at::Tensor>& lr_tensor, int64_t stream);

}  // namespace effikern
