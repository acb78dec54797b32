// Fused knowledge-distillation loss on CPU: per-token loss and the student's gradient in one visit per row.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace effikern {

// Per token i (row of V logits), with p = softmax(teacher_i / T), q = softmax(student_i / T):
//   loss_i = soft_weight * T^2 * KL(p || q) + hard_weight * CE(student_i, target_i)
//   grad_i = soft_weight * T * (q - p) + hard_weight * (softmax(student_i) - onehot(target_i))
// Rows whose target is ignore_index get loss 0 and gradient 0; without a target the CE term is absent.
//
// student, teacher: [M, V] contiguous, same dtype (float32, float16, bfloat16 or float64); target: [M] int64
// contiguous or none. Math is float32 (float64 for float64 logits). Returns (loss [M] float32 (float64 for
// float64), grad [M, V] in the logits' dtype, or an empty [0] tensor when compute_grad is false).
// Arguments are validated by the op layer (effikern/ops/distill.py), not here.
std::tuple<at::Tensor, at::Tensor> distill_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target, double temperature,
                                                   double soft_weight, double hard_weight, int64_t ignore_index,
                                                   bool compute_grad);

}  // namespace effikern
