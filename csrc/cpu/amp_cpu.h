// Fused loss-scaling kernels on CPU: one multi-tensor pass for unscale + inf/nan check + grad norm, and fused
// AdamW / SGD updates that take the gradient scale (and a clip coefficient) as a factor.
//
// The exact contract (shared with the torch, triton and cuda backends) is docs/amp_kernels.md,
// summarised in effikern/ops/amp.py. Arguments are validated by the op layer (effikern/ops/amp.py), not here:
// every list holds contiguous CPU tensors of float32/float16/bfloat16, element i of each list has the same
// shape and dtype (grads may mix dtypes across i), and the 1-element tensors are float32.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace effikern {

/// For every grad g: found_inf = 1 if g holds an inf or nan (never reset to 0); with write_back, g *= inv_scale
/// in place (fp32 math, rounded to g's dtype). Returns a new 0-dim float32 tensor: the norm of all
/// grad * inv_scale together (norm_type 2: sqrt of the sum of squares; inf: max |.|; 0: not computed, 0.0).
at::Tensor amp_unscale_check_norm_cpu(const std::vector<at::Tensor>& grads, const at::Tensor& inv_scale,
                                      const at::Tensor& found_inf, double norm_type, bool write_back);

/// torch.optim.AdamW's update on every (param, grad, exp_avg, exp_avg_sq), with grad * grad_factor as the
/// gradient; nothing changes when found_inf is nonzero. step (float32, shared) is the count before this update
/// and is incremented when the update happens. lr_tensor: None, or a 1-element float32/float64 tensor whose
/// value (read once per call) replaces lr.
void amp_fused_adamw_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                         const at::Tensor& step, double lr, double beta1, double beta2, double eps,
                         double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_factor,
                         const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor);

/// torch.optim.SGD's update (momentum, dampening, nesterov, weight decay, maximize); momentum_buffers is empty
/// when momentum == 0. step == 0 means the buffers are uninitialised (the first update sets buf = g).
/// lr_tensor as in amp_fused_adamw_cpu.
void amp_fused_sgd_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& momentum_buffers, const at::Tensor& step, double lr,
                       double momentum, double dampening, bool nesterov, double weight_decay, bool maximize,
                       const c10::optional<at::Tensor>& grad_factor, const c10::optional<at::Tensor>& found_inf,
                       const c10::optional<at::Tensor>& lr_tensor);

}  // namespace effikern
