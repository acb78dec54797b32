// Torch glue of the fused GradScaler / optimizer CUDA kernels: checks the lists, groups them by dtype, and
// hands raw pointers and element counts to the launchers of amp_kernels.cu (one dtype per launcher call;
// each splits its tensors over as many launches as its kernel-argument tables need).
//
// Compiled by the host compiler against <torch/extension.h> only (no c10/cuda, no ATen/cuda): the CPU torch
// wheel used on CI lacks the CUDA build headers those need. The caller (effikern/ops/amp.py) makes the
// tensors' device current and passes torch's current stream, so no device guard or stream header is needed.
// All device work is enqueued on that one stream; nothing is read back to the host.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "amp_cuda.h"
#include "amp_kernels.h"
#include "torch_glue.h"

namespace effikern {
namespace {

namespace ka = effikern::cuda::amp;

using glue::as_stream;

void check_launch(cudaError_t err) {
  glue::check_launch(err, "amp", " (the multi-tensor kernels pass ~27 KB kernel arguments: they need CUDA 12.1+"
                                 " driver and toolkit)");
}

constexpr int kNumDTypes = 3;

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return static_cast<int>(ka::DType::kFloat32);
    case at::kHalf: return static_cast<int>(ka::DType::kFloat16);
    case at::kBFloat16: return static_cast<int>(ka::DType::kBFloat16);
    default: return -1;
  }
}

/// The device of the work (the current one), checked against the tensors that define it.
at::Device work_device(const at::Tensor& like) {
  TORCH_CHECK(like.is_cuda(), "effikern amp CUDA: expected CUDA tensors, got one on ", like.device());
  int device = -1;
  check_launch(cudaGetDevice(&device));
  TORCH_CHECK(device == like.get_device(), "effikern amp CUDA: tensors are on cuda:", like.get_device(),
              " but cuda:", device, " is current (call through effikern.ops, which sets the device)");
  return like.device();
}

/// A 1-element float32 tensor on `device` (inv_scale, found_inf, step, grad_factor).
void check_scalar(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined() && t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == device,
              "effikern amp CUDA: ", name, " must be a float32 tensor with 1 element on ", device);
}

const float* scalar_or_null(const c10::optional<at::Tensor>& t, const char* name, const at::Device& device) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_scalar(*t, name, device);
  return t->data_ptr<float>();
}

/// Sets h.lr_ptr / h.lr_f64 from a tensor lr (None: h.lr stays the learning rate). The kernels read it on the
/// device, so a captured CUDA graph follows what an LR scheduler writes into it.
template <typename Hyper>
void set_device_lr(Hyper& h, const c10::optional<at::Tensor>& lr_tensor, const at::Device& device) {
  if (!lr_tensor.has_value() || !lr_tensor->defined()) return;
  const at::Tensor& t = *lr_tensor;
  TORCH_CHECK(t.numel() == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
                  t.device() == device,
              "effikern amp CUDA: lr_tensor must be a float32 or float64 tensor with 1 element on ", device, ", got ",
              t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
  h.lr_ptr = t.data_ptr();
  h.lr_f64 = t.scalar_type() == at::kDouble;
}

/// One dtype's share of the lists: per list the data pointers, and the shared element counts.
struct Group {
  std::vector<std::vector<void*>> ptrs;
  std::vector<int64_t> numels;
  int size() const { return static_cast<int>(numels.size()); }
};

/// Splits equal-length lists (element i of each: same dtype and numel, contiguous, on `device`) by dtype.
std::array<Group, kNumDTypes> group_by_dtype(const std::vector<const std::vector<at::Tensor>*>& lists,
                                             const std::vector<const char*>& names, const at::Device& device) {
  const size_t n = lists[0]->size();
  TORCH_CHECK(n <= static_cast<size_t>(INT_MAX), "effikern amp CUDA: too many tensors (", n, ")");
  std::array<Group, kNumDTypes> groups;
  for (Group& g : groups) g.ptrs.resize(lists.size());
  for (size_t l = 0; l < lists.size(); ++l) {
    TORCH_CHECK(lists[l]->size() == n, "effikern amp CUDA: ", names[l], " has ", lists[l]->size(),
                " tensors, expected ", n, " (one per param)");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& first = (*lists[0])[i];
    const int d = dtype_index(first.scalar_type());
    TORCH_CHECK(d >= 0, "effikern amp CUDA: ", names[0], "[", i, "] must be float32, float16 or bfloat16, got ",
                first.scalar_type());
    for (size_t l = 0; l < lists.size(); ++l) {
      const at::Tensor& t = (*lists[l])[i];
      TORCH_CHECK(t.scalar_type() == first.scalar_type() && t.numel() == first.numel(), "effikern amp CUDA: ",
                  names[l], "[", i, "] must have the dtype and numel of ", names[0], "[", i, "]");
      TORCH_CHECK(t.device() == device, "effikern amp CUDA: ", names[l], "[", i, "] is on ", t.device(),
                  ", expected ", device);
      TORCH_CHECK(t.is_contiguous(), "effikern amp CUDA: ", names[l], "[", i,
                  "] must be contiguous (the op layer falls back for non-contiguous tensors)");
      groups[d].ptrs[l].push_back(t.data_ptr());
    }
    groups[d].numels.push_back(first.numel());
  }
  return groups;
}

}  // namespace

at::Tensor amp_unscale_check_norm_cuda(const std::vector<at::Tensor>& grads, const at::Tensor& inv_scale,
                                       const at::Tensor& found_inf, double norm_type, bool write_back,
                                       int64_t stream) {
  const at::Device device = work_device(grads.empty() ? inv_scale : grads[0]);
  check_scalar(inv_scale, "inv_scale", device);
  check_scalar(found_inf, "found_inf", device);
  ka::Norm norm;
  if (norm_type == 2.0) {
    norm = ka::Norm::kL2;
  } else if (std::isinf(norm_type) && norm_type > 0) {
    norm = ka::Norm::kInf;
  } else {
    TORCH_CHECK(norm_type == 0.0, "effikern amp CUDA: norm_type must be 2.0, inf or 0.0 (no norm), got ",
                norm_type);
    norm = ka::Norm::kNone;
  }
  const cudaStream_t s = as_stream(stream);
  const auto groups = group_by_dtype({&grads}, {"grads"}, device);

  int64_t total_chunks = 0;
  for (const Group& g : groups) total_chunks += ka::num_chunks(g.numels.data(), g.size());
  const auto f32 = inv_scale.options();
  const at::Tensor partials = at::empty({std::max<int64_t>(norm == ka::Norm::kNone ? 0 : total_chunks, 1)}, f32);
  const at::Tensor out = at::empty({}, f32);

  int64_t offset = 0;
  for (int d = 0; d < kNumDTypes; ++d) {
    const Group& g = groups[d];
    if (g.size() == 0) continue;
    float* part = norm == ka::Norm::kNone ? nullptr : partials.data_ptr<float>() + offset;
    check_launch(ka::unscale_check_norm(static_cast<ka::DType>(d), g.ptrs[0].data(), g.numels.data(), g.size(),
                                        inv_scale.data_ptr<float>(), found_inf.data_ptr<float>(), norm, write_back,
                                        part, s));
    offset += ka::num_chunks(g.numels.data(), g.size());
  }
  check_launch(ka::norm_finish(partials.data_ptr<float>(), norm == ka::Norm::kNone ? 0 : total_chunks, norm,
                               out.data_ptr<float>(), s));
  return out;
}

void amp_fused_adamw_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                          const at::Tensor& step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_factor,
                          const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor,
                          int64_t stream) {
  const at::Device device = work_device(params.empty() ? step : params[0]);
  check_scalar(step, "step", device);
  const float* factor = scalar_or_null(grad_factor, "grad_factor", device);
  const float* inf = scalar_or_null(found_inf, "found_inf", device);
  const cudaStream_t s = as_stream(stream);
  const auto groups = group_by_dtype({&params, &grads, &exp_avgs, &exp_avg_sqs},
                                     {"params", "grads", "exp_avgs", "exp_avg_sqs"}, device);
  ka::AdamWHyper h{lr, beta1, beta2, eps, weight_decay, maximize};
  set_device_lr(h, lr_tensor, device);
  for (int d = 0; d < kNumDTypes; ++d) {
    const Group& g = groups[d];
    if (g.size() == 0) continue;
    check_launch(ka::fused_adamw(static_cast<ka::DType>(d), g.ptrs[0].data(), g.ptrs[1].data(), g.ptrs[2].data(),
                                 g.ptrs[3].data(), g.numels.data(), g.size(), step.data_ptr<float>(), factor, inf,
                                 h, s));
  }
  // After every update launch: they all read the old step.
  check_launch(ka::increment_step(step.data_ptr<float>(), inf, s));
}

void amp_fused_sgd_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& momentum_buffers, const at::Tensor& step, double lr,
                        double momentum, double dampening, bool nesterov, double weight_decay, bool maximize,
                        const c10::optional<at::Tensor>& grad_factor, const c10::optional<at::Tensor>& found_inf,
                        const c10::optional<at::Tensor>& lr_tensor, int64_t stream) {
  const at::Device device = work_device(params.empty() ? step : params[0]);
  check_scalar(step, "step", device);
  const float* factor = scalar_or_null(grad_factor, "grad_factor", device);
  const float* inf = scalar_or_null(found_inf, "found_inf", device);
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(has_momentum || momentum_buffers.empty(),
              "effikern amp CUDA: momentum_buffers must be empty when momentum == 0, got ", momentum_buffers.size());
  const cudaStream_t s = as_stream(stream);
  std::vector<const std::vector<at::Tensor>*> lists{&params, &grads};
  std::vector<const char*> names{"params", "grads"};
  if (has_momentum) {
    lists.push_back(&momentum_buffers);
    names.push_back("momentum_buffers");
  }
  const auto groups = group_by_dtype(lists, names, device);
  ka::SgdHyper h{lr, momentum, dampening, weight_decay, nesterov, maximize};
  set_device_lr(h, lr_tensor, device);
  for (int d = 0; d < kNumDTypes; ++d) {
    const Group& g = groups[d];
    if (g.size() == 0) continue;
    check_launch(ka::fused_sgd(static_cast<ka::DType>(d), g.ptrs[0].data(), g.ptrs[1].data(),
                               has_momentum ? g.ptrs[2].data() : nullptr, g.numels.data(), g.size(),
                               step.data_ptr<float>(), factor, inf, h, s));
  }
  check_launch(ka::increment_step(step.data_ptr<float>(), inf, s));
}

}  // namespace effikern
