// Torch glue of the sparse-weight matmul CUDA kernels: allocates outputs with torch, lays activations out the
// way each kernel reads them, and calls the launchers of sparse_kernels.cu with raw pointers.
//
// Compiled by the host compiler against <torch/extension.h> only (no c10/cuda, no ATen/cuda: the CPU torch
// wheel on CI lacks their build headers). The op layer (effikern/ops/sparse.py) validates every argument,
// makes the inputs' device current and passes torch's current stream; the checks here are cheap internal
// asserts that keep a wrong call from reading out of bounds. Torch ops used here (contiguous, transpose
// copies, zeros) run on torch's current stream, the same one the kernels are enqueued on.
#include <torch/extension.h>

#include <climits>
#include <cstdint>

#include "sparse_cuda.h"
#include "sparse_kernels.h"
#include "torch_glue.h"

namespace effikern {
namespace {

namespace sk = effikern::cuda::sparse;

using glue::as_stream;

void check_launch(cudaError_t err) { glue::check_launch(err, "sparse"); }

sk::DType kernel_dtype(const at::Tensor& t) { return glue::kernel_dtype(t, "sparse"); }

/// x (or gy) is a 2-d CUDA tensor on the current device with the expected number of columns.
void check_activation(const at::Tensor& t, int64_t cols, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.size(1) == cols, "effikern sparse CUDA: ", name,
              " must be a 2-d CUDA tensor with ", cols, " columns, got ", t.sizes());
  int device = -1;
  check_launch(cudaGetDevice(&device));
  TORCH_CHECK(device == t.get_device(), "effikern sparse CUDA: ", name, " is on cuda:", t.get_device(), " but cuda:",
              device, " is current (call through effikern.ops, which sets the device)");
}

/// A contiguous 1-d index tensor of `numel` entries (numel < 0: any length) on like's device, of `dtype`:
/// int32 for pointers, segments and permutations, uint8 for in-panel offsets (CSR col and t_row).
void check_index(const at::Tensor& t, int64_t numel, const at::Tensor& like, const char* name,
                 at::ScalarType dtype = at::kInt) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device() == like.device() && t.dim() == 1,
              "effikern sparse CUDA: ", name, " must be a contiguous 1-d ", dtype == at::kByte ? "uint8" : "int32",
              " tensor on ", like.device(), ", got a ", t.dim(), "-d ", t.scalar_type(), " tensor on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(numel < 0 || t.numel() == numel, "effikern sparse CUDA: ", name, " must have ", numel,
              " entries, got ", t.numel());
}

/// Pointer array of a panelled CSR over `rows` rows of `width` columns: one int32 per (row, 256-column panel),
/// plus one. The length is checked here with its formula, so a pre-panel crow [rows + 1] is named as such.
void check_panel_pointers(const at::Tensor& t, int64_t rows, int64_t width, const at::Tensor& like,
                          const char* name) {
  check_index(t, -1, like, name);
  const int64_t panels = sk::csr_panels(width);
  TORCH_CHECK(rows >= 0 && t.numel() == rows * panels + 1, "effikern sparse CUDA: ", name, " must have ", rows,
              " * ", panels, " + 1 = ", rows * panels + 1, " entries (one int32 pointer per row and ",
              sk::kCsrPanel, "-column panel of ", width, " columns, plus one), got ", t.numel());
}

/// values (and bias) in the activation's dtype, contiguous, on its device.
void check_same(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device() && t.is_contiguous(),
              "effikern sparse CUDA: ", name, " must be contiguous with dtype ", like.scalar_type(), " on ",
              like.device());
}

const void* bias_ptr(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_same(*bias, x, "bias");
  TORCH_CHECK(bias->numel() == N, "effikern sparse CUDA: bias must have ", N, " entries");
  return bias->data_ptr();
}

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "effikern sparse CUDA: ", what, " = ", v, " does not fit in int32");
  return static_cast<int>(v);
}

/// [M, C] -> its transpose [C, M], contiguous: the token-major layout the CSR kernels gather from.
at::Tensor token_major(const at::Tensor& t) { return t.t().contiguous(); }

/// Shared by CSR forward and grad_input: out [M, out_features].
at::Tensor csr_mm(const at::Tensor& a, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor* perm,
                  const at::Tensor& values, const void* bias, int64_t in_features, int64_t out_features,
                  int64_t stream) {
  const at::Tensor out = at::empty({a.size(0), out_features}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.size(0) == 0 || out_features == 0) return out;
  as_int(values.numel(), "nnz");
  const at::Tensor a_t = token_major(a);
  check_launch(sk::csr_mm(kernel_dtype(a), a_t.data_ptr(), a.size(0), in_features, ptr.data_ptr<int32_t>(),
                          idx.data_ptr<uint8_t>(), perm != nullptr ? perm->data_ptr<int32_t>() : nullptr,
                          values.data_ptr(), bias, out_features, out.data_ptr(), as_stream(stream)));
  return out;
}

/// Shared by BSR forward and grad_input.
at::Tensor bsr_mm(const at::Tensor& a, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor* perm,
                  const at::Tensor& values, const void* bias, int64_t in_features, int64_t out_features,
                  bool transposed, int64_t stream) {
  const at::Tensor out = at::empty({a.size(0), out_features}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (a.size(0) == 0 || out_features == 0) return out;
  const at::Tensor ac = a.contiguous();
  check_launch(sk::bsr_mm(kernel_dtype(a), ac.data_ptr(), a.size(0), in_features, ptr.data_ptr<int32_t>(),
                          idx.data_ptr<int32_t>(), perm != nullptr ? perm->data_ptr<int32_t>() : nullptr,
                          values.data_ptr(), as_int(values.size(1), "BR"), as_int(values.size(2), "BC"), transposed,
                          bias, out_features, out.data_ptr(), as_stream(stream)));
  return out;
}

void check_bsr_values(const at::Tensor& values, const at::Tensor& like) {
  check_same(values, like, "values");
  TORCH_CHECK(values.dim() == 3 && values.size(1) > 0 && values.size(2) > 0,
              "effikern sparse CUDA: values must be [nnzb, BR, BC] with BR, BC >= 1, got ", values.sizes());
}

}  // namespace

at::Tensor sparse_csr_fwd_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                               int64_t stream) {
  check_activation(x, K, "x");
  check_same(values, x, "values");
  check_panel_pointers(crow, N, K, x, "crow");
  check_index(col, values.numel(), x, "col", at::kByte);
  return csr_mm(x, crow, col, nullptr, values, bias_ptr(bias, x, N), K, N, stream);
}

at::Tensor sparse_csr_grad_input_cuda(const at::Tensor& gy, const at::Tensor& t_crow, const at::Tensor& t_row,
                                      const at::Tensor& t_perm, const at::Tensor& values, int64_t N, int64_t K,
                                      int64_t stream) {
  check_activation(gy, N, "gy");
  check_same(values, gy, "values");
  check_panel_pointers(t_crow, K, N, gy, "t_crow");
  check_index(t_row, values.numel(), gy, "t_row", at::kByte);
  check_index(t_perm, values.numel(), gy, "t_perm");
  return csr_mm(gy, t_crow, t_row, &t_perm, values, nullptr, N, K, stream);
}

at::Tensor sparse_csr_grad_values_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& row,
                                       const at::Tensor& col, int64_t stream) {
  check_activation(x, x.size(-1), "x");
  check_activation(gy, gy.size(-1), "gy");
  TORCH_CHECK(gy.size(0) == x.size(0) && gy.scalar_type() == x.scalar_type(),
              "effikern sparse CUDA: gy and x must have the same number of rows and dtype");
  check_index(row, -1, x, "row");
  check_index(col, row.numel(), x, "col", at::kByte);
  const at::Tensor out = at::empty({row.numel()}, x.options());
  if (row.numel() == 0) return out;
  const at::Tensor gy_t = token_major(gy), x_t = token_major(x);
  // row holds segments s = n*P + panel with P = ceil(K/256) from x's width (docs/sparse_kernels.md).
  check_launch(sk::csr_sddmm(kernel_dtype(x), gy_t.data_ptr(), x_t.data_ptr(), x.size(0), gy.size(1), x.size(1),
                             row.data_ptr<int32_t>(), col.data_ptr<uint8_t>(), row.numel(), out.data_ptr(),
                             as_stream(stream)));
  return out;
}

at::Tensor sparse_bsr_fwd_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                               int64_t stream) {
  check_activation(x, K, "x");
  check_bsr_values(values, x);
  const int64_t BR = values.size(1);
  check_index(crow, (N + BR - 1) / BR + 1, x, "crow");
  check_index(col, values.size(0), x, "col");
  return bsr_mm(x, crow, col, nullptr, values, bias_ptr(bias, x, N), K, N, false, stream);
}

at::Tensor sparse_bsr_grad_input_cuda(const at::Tensor& gy, const at::Tensor& t_crow, const at::Tensor& t_row,
                                      const at::Tensor& t_perm, const at::Tensor& values, int64_t N, int64_t K,
                                      int64_t stream) {
  check_activation(gy, N, "gy");
  check_bsr_values(values, gy);
  const int64_t BC = values.size(2);
  check_index(t_crow, (K + BC - 1) / BC + 1, gy, "t_crow");
  check_index(t_row, values.size(0), gy, "t_row");
  check_index(t_perm, values.size(0), gy, "t_perm");
  return bsr_mm(gy, t_crow, t_row, &t_perm, values, nullptr, N, K, true, stream);
}

at::Tensor sparse_bsr_grad_values_cuda(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& row,
                                       const at::Tensor& col, at::IntArrayRef values_shape, int64_t stream) {
  check_activation(x, x.size(-1), "x");
  check_activation(gy, gy.size(-1), "gy");
  TORCH_CHECK(gy.size(0) == x.size(0) && gy.scalar_type() == x.scalar_type(),
              "effikern sparse CUDA: gy and x must have the same number of rows and dtype");
  TORCH_CHECK(values_shape.size() == 3 && values_shape[1] > 0 && values_shape[2] > 0,
              "effikern sparse CUDA: values_shape must be (nnzb, BR, BC), got ", values_shape);
  check_index(row, values_shape[0], x, "row");
  check_index(col, values_shape[0], x, "col");
  const at::Tensor out = at::empty(values_shape, x.options());
  if (values_shape[0] == 0) return out;
  const at::Tensor gyc = gy.contiguous(), xc = x.contiguous();
  check_launch(sk::bsr_sddmm(kernel_dtype(x), gyc.data_ptr(), xc.data_ptr(), x.size(0), gy.size(1), x.size(1),
                             row.data_ptr<int32_t>(), col.data_ptr<int32_t>(), values_shape[0],
                             as_int(values_shape[1], "BR"), as_int(values_shape[2], "BC"), out.data_ptr(),
                             as_stream(stream)));
  return out;
}

}  // namespace effikern
