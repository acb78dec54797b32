// Torch glue of the CUDA dwsep kernels: allocates outputs and fp32 scratch with torch, describes tensors by
// raw pointers and element strides, and calls the launchers of dwsep_kernels.cu.
//
// Compiled by the host compiler against <torch/extension.h> only (no c10/cuda, no ATen/cuda): the CPU
// torch wheel used on CI lacks the CUDA build headers those need. The caller (effikern/ops/dwsep.py) makes
// x's device current and passes torch's current stream, so no device guard or stream header is needed here.
// All device work, casts included, is enqueued by the launchers on that one stream.
#include <torch/extension.h>

#include <climits>
#include <cstdint>

#include "dwsep_cuda.h"
#include "dwsep_kernels.h"
#include "torch_glue.h"

namespace effikern {
namespace {

namespace ek = effikern::cuda;

using glue::as_stream;

void check_launch(cudaError_t err) { glue::check_launch(err, "dwsep"); }

ek::DType kernel_dtype(const at::Tensor& t) { return glue::kernel_dtype(t, "dwsep"); }

ek::Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "effikern dwsep CUDA: ", what, " = ", v, " does not fit in int32");
  return static_cast<int>(v);
}

/// Cheap internal asserts (the op layer has validated everything): same CUDA device as current, 4-d x.
void check_inputs(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "effikern dwsep CUDA: x must be a 4-d CUDA tensor");
  TORCH_CHECK(dw_weight.is_contiguous() && pw_weight.is_contiguous(), "effikern dwsep CUDA: weights must be contiguous");
  TORCH_CHECK(dw_weight.scalar_type() == x.scalar_type() && pw_weight.scalar_type() == x.scalar_type(),
              "effikern dwsep CUDA: weights must have x's dtype");
  int device = -1;
  check_launch(cudaGetDevice(&device));
  TORCH_CHECK(device == x.get_device(), "effikern dwsep CUDA: x is on cuda:", x.get_device(), " but cuda:", device,
              " is current (call through effikern.ops, which sets the device)");
}

/// Geometry of the problem; y strides are filled in by the caller.
ek::DwsepGeometry make_geometry(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "effikern dwsep CUDA: stride, padding and dilation must be pairs");
  ek::DwsepGeometry g{};
  g.N = as_int(x.size(0), "N");
  g.C = as_int(x.size(1), "C");
  g.H = as_int(x.size(2), "H");
  g.W = as_int(x.size(3), "W");
  g.Cout = as_int(pw_weight.size(0), "Cout");
  g.kh = as_int(dw_weight.size(2), "kh");
  g.kw = as_int(dw_weight.size(3), "kw");
  g.sh = as_int(stride[0], "stride[0]");
  g.sw = as_int(stride[1], "stride[1]");
  g.ph = as_int(padding[0], "padding[0]");
  g.pw = as_int(padding[1], "padding[1]");
  g.dh = as_int(dilation[0], "dilation[0]");
  g.dw = as_int(dilation[1], "dilation[1]");
  const int64_t ho = (x.size(2) + 2 * padding[0] - dilation[0] * (dw_weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t wo = (x.size(3) + 2 * padding[1] - dilation[1] * (dw_weight.size(3) - 1) - 1) / stride[1] + 1;
  g.Ho = as_int(ho, "Ho");
  g.Wo = as_int(wo, "Wo");
  TORCH_CHECK(g.N >= 1 && g.C >= 1 && g.Cout >= 1 && g.Ho >= 1 && g.Wo >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 &&
                  g.dw >= 1,
              "effikern dwsep CUDA: empty or invalid geometry (the op layer handles empty inputs)");
  // The kernels keep in-image coordinates in int32: padded row/column positions, one output plane's pixel index,
  // a tap index. Offsets into tensors are int64.
  as_int(x.size(2) + 2 * padding[0], "H + 2*ph");
  as_int(x.size(3) + 2 * padding[1], "W + 2*pw");
  as_int(ho * wo, "Ho * Wo");
  as_int(dw_weight.size(2) * dw_weight.size(3), "kh * kw");
  g.x = strides_of(x);
  return g;
}

/// The weight as fp32 [rows, cols] (or [cols, rows] with transpose): t itself when that is already the case,
/// else a copy converted on `stream`.
at::Tensor weight_f32(const at::Tensor& t, int64_t rows, int64_t cols, bool transpose, cudaStream_t stream) {
  if (t.scalar_type() == at::kFloat && !transpose) return t;
  at::Tensor out = at::empty({transpose ? cols : rows, transpose ? rows : cols}, t.options().dtype(at::kFloat));
  check_launch(ek::convert_to_f32(t.data_ptr(), kernel_dtype(t), out.data_ptr<float>(), rows, cols, transpose, stream));
  return out;
}

/// fp32 copy of an optional bias, or an undefined tensor for None.
at::Tensor bias_f32(const c10::optional<at::Tensor>& b, cudaStream_t stream) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  TORCH_CHECK(b->is_contiguous(), "effikern dwsep CUDA: biases must be contiguous");
  return weight_f32(*b, 1, b->numel(), false, stream);
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

/// The fp32 accumulator `acc` in `like`'s dtype, reshaped to `sizes` (no copy for fp32).
at::Tensor from_f32(const at::Tensor& acc, const at::Tensor& like, at::IntArrayRef sizes, cudaStream_t stream) {
  if (like.scalar_type() == at::kFloat) return acc.view(sizes);
  at::Tensor out = at::empty(sizes, like.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(ek::convert_from_f32(acc.data_ptr<float>(), out.data_ptr(), kernel_dtype(like), acc.numel(), stream));
  return out;
}

}  // namespace

at::Tensor dwsep_fwd_cuda(const at::Tensor& x, const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                          const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t activation, const c10::optional<at::Tensor>& residual, int64_t stream) {
  check_inputs(x, dw_weight, pw_weight);
  const cudaStream_t s = as_stream(stream);
  ek::DwsepGeometry g = make_geometry(x, dw_weight, pw_weight, stride, padding, dilation);

  const at::Tensor y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(x.suggest_memory_format()));
  g.y = strides_of(y);

  const int64_t taps = static_cast<int64_t>(g.kh) * g.kw;
  const at::Tensor dw_w = weight_f32(dw_weight, g.C, taps, false, s);
  const at::Tensor pw_wT = weight_f32(pw_weight, g.Cout, g.C, true, s);  // [C, Cout]
  const at::Tensor dw_b = bias_f32(dw_bias, s);
  const at::Tensor pw_b = bias_f32(pw_bias, s);

  const void* res = nullptr;
  ek::Strides4 res_strides{0, 0, 0, 0};
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                "effikern dwsep CUDA: residual must be [N, Cout, Ho, Wo] with x's dtype and device");
    res = residual->data_ptr();
    res_strides = strides_of(*residual);  // any strides: the kernel indexes it like y
  }

  check_launch(ek::dwsep_forward(g, kernel_dtype(x), x.data_ptr(), dw_w.data_ptr<float>(), ptr_or_null(dw_b),
                                 pw_wT.data_ptr<float>(), ptr_or_null(pw_b), res, res_strides, y.data_ptr(),
                                 static_cast<int>(activation), s));
  return y;
}

std::vector<at::Tensor> dwsep_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight,
                                       const c10::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t activation, int64_t stream) {
  check_inputs(x, dw_weight, pw_weight);
  const cudaStream_t s = as_stream(stream);
  ek::DwsepGeometry g = make_geometry(x, dw_weight, pw_weight, stride, padding, dilation);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == g.N && grad_y.size(1) == g.Cout && grad_y.size(2) == g.Ho &&
                  grad_y.size(3) == g.Wo && grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "effikern dwsep CUDA: grad_y must be [N, Cout, Ho, Wo] with x's dtype and device");
  g.y = strides_of(grad_y);  // any strides; the op layer passes x's memory format

  const int64_t taps = static_cast<int64_t>(g.kh) * g.kw;
  const at::Tensor dw_w = weight_f32(dw_weight, g.C, taps, false, s);
  const at::Tensor pw_w = weight_f32(pw_weight, g.Cout, g.C, false, s);  // [Cout, C]
  const at::Tensor dw_b = bias_f32(dw_bias, s);

  const auto f32 = x.options().dtype(at::kFloat);
  // grad_z in x's memory format: the grad_x gather then reads it in the order it writes grad_x.
  const at::Tensor grad_z = at::empty({g.N, g.C, g.Ho, g.Wo}, f32.memory_format(x.suggest_memory_format()));
  // empty_like keeps x's exact strides, which the kernel uses for both x and grad_x.
  const at::Tensor grad_x = at::empty_like(x);
  TORCH_CHECK(grad_x.strides() == x.strides(), "effikern dwsep CUDA: x must be dense (NCHW or channels_last)");
  const at::Tensor gdw_w = at::empty({g.C, taps}, f32);
  const at::Tensor gdw_b = at::empty({g.C}, f32);
  const at::Tensor gpw_w = at::empty({g.Cout, g.C}, f32);
  const at::Tensor gpw_b = at::empty({g.Cout}, f32);

  check_launch(ek::dwsep_backward(g, kernel_dtype(x), grad_y.data_ptr(), x.data_ptr(), dw_w.data_ptr<float>(),
                                  ptr_or_null(dw_b), pw_w.data_ptr<float>(), static_cast<int>(activation),
                                  grad_z.data_ptr<float>(), strides_of(grad_z), grad_x.data_ptr(),
                                  gdw_w.data_ptr<float>(), gdw_b.data_ptr<float>(), gpw_w.data_ptr<float>(),
                                  gpw_b.data_ptr<float>(), s));
  return {grad_x, from_f32(gdw_w, x, dw_weight.sizes(), s), from_f32(gdw_b, x, {g.C}, s),
          from_f32(gpw_w, x, pw_weight.sizes(), s), from_f32(gpw_b, x, {g.Cout}, s)};
}

}  // namespace effikern
