// Host launchers of the fused GradScaler / optimizer CUDA kernels (amp_kernels.cu); interface and math:
// docs/amp_kernels.md (issue #5).
//
// The seam between the torch glue (amp_cuda.cpp, host compiler) and the kernels (nvcc): no torch type, no
// CUDA header beyond cuda_runtime_api.h, so both sides compile against the CPU torch wheel on CI.
//
// Every launcher takes ONE dtype's tensors as raw device pointers plus element counts (the glue groups a
// mixed list by dtype), enqueues its work on `stream` and returns the first CUDA error, or cudaSuccess.
// Nothing is synchronised and no device value is read on the host. Tensors may number anything from 0 up:
// the launchers split them over as many launches as their kernel-argument tables need. Empty tensors are
// skipped. Element type in memory: kFloat32/kFloat16/kBFloat16; all arithmetic is fp32.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace effikern {
namespace cuda {
namespace amp {

/// Element type of one launch's tensors: dtype.h.
using ::effikern::cuda::DType;

/// What unscale_check_norm reduces: nothing, sum of squares (L2), or max |.| (inf).
enum class Norm : int { kNone = 0, kL2 = 1, kInf = 2 };

/// Number of chunks (= norm partials) unscale_check_norm produces for these tensors (sum of ceil(numel / chunk)).
int64_t num_chunks(const int64_t* numels, int n_tensors);

/// grads[i] (numels[i] elements of `dtype`) for i < n_tensors:
///   found_inf <- 1.0 (plain store) if any element is inf or nan; never reset;
///   with write_back, grads[i] <- grads[i] * inv_scale (fp32 math, rounded to dtype);
///   partials[j] <- sum of squares (kL2) or max |.| (kInf, NaN kept) of grad * inv_scale over chunk j, for the
///   num_chunks(numels, n_tensors) chunks in order; partials is not touched for kNone (may be nullptr).
/// inv_scale, found_inf: 1-element fp32 device buffers.
cudaError_t unscale_check_norm(DType dtype, void* const* grads, const int64_t* numels, int n_tensors,
                               const float* inv_scale, float* found_inf, Norm norm, bool write_back,
                               float* partials, cudaStream_t stream);

/// out[0] <- sqrt(sum partials) (kL2) or max partials with NaN kept (kInf); 0 for n == 0 or kNone.
cudaError_t norm_finish(const float* partials, int64_t n, Norm norm, float* out, cudaStream_t stream);

struct AdamWHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
  /// A tensor lr: when non-null, lr is read from this 1-element device buffer (float64 if lr_f64, else float32)
  /// by the kernel at run time and `lr` above is ignored. What lets a CUDA graph replay the value an LR
  /// scheduler wrote in place, where a host lr would be frozen into the captured launch.
  const void* lr_ptr = nullptr;
  bool lr_f64 = false;
};

/// torch.optim.AdamW's update, in place, on n_tensors (param, grad, exp_avg, exp_avg_sq) quadruples of
/// `dtype` (element i of each list has numels[i] elements). step: the shared fp32 step count BEFORE the
/// update, read on the device (bias corrections use step + 1, computed in double); NOT incremented here
/// (call increment_step after all dtype groups). grad_factor: nullptr or 1-element fp32 multiplier of the
/// grads; found_inf: nullptr or 1-element fp32, nonzero -> nothing is written.
cudaError_t fused_adamw(DType dtype, void* const* params, void* const* grads, void* const* exp_avgs,
                        void* const* exp_avg_sqs, const int64_t* numels, int n_tensors, const float* step,
                        const float* grad_factor, const float* found_inf, const AdamWHyper& h,
                        cudaStream_t stream);

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
  const void* lr_ptr = nullptr;  ///< as in AdamWHyper
  bool lr_f64 = false;
};

/// torch.optim.SGD's update, in place. momentum_buffers: nullptr when h.momentum == 0, else one per param;
/// step == 0 (read on the device) means the buffers are uninitialised and are set to the gradient.
/// step, grad_factor, found_inf as in fused_adamw.
cudaError_t fused_sgd(DType dtype, void* const* params, void* const* grads, void* const* momentum_buffers,
                      const int64_t* numels, int n_tensors, const float* step, const float* grad_factor,
                      const float* found_inf, const SgdHyper& h, cudaStream_t stream);

/// step[0] += 1 unless found_inf (nullable) is nonzero. Launch after every update launch of the step.
cudaError_t increment_step(float* step, const float* found_inf, cudaStream_t stream);

}  // namespace amp
}  // namespace cuda
}  // namespace effikern
