// The one binding file of effikern._C: exposes each kernel family's C++ entry points to Python.
// Validation is NOT done here: the torch.library op layer (effikern/ops/*.py) checks every argument once,
// before any of these is called.
#include <torch/extension.h>

#include "cpu/amp_cpu.h"
#include "cpu/bf16_gemm.h"
#include "cpu/distill_cpu.h"
#include "cpu/dwsep_cpu.h"
#include "cpu/half_convert.h"
#include "cpu/output_alloc.h"
#include "cpu/scale_rows_cpu.h"
#include "cpu/scratch.h"
#include "cpu/sparse_cpu.h"
#ifdef EFFIKERN_WITH_CUDA
#include "cuda/amp_cuda.h"
#include "cuda/dwsep_cuda.h"
#include "cuda/sparse_cuda.h"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef EFFIKERN_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = py::none();
#endif
  info["compiler"] = __VERSION__;
  info["cpu_bf16_dot"] = effikern::bf16_gemm::available();
  return info;
}

// For tests only: C = bf16(A) bf16(B) in fp32 through bf16_gemm's rounding, packing and GEMM, on one thread.
// A [M, K] and B [K, N] are contiguous fp32.
at::Tensor bf16_gemm_for_test(const at::Tensor& A, const at::Tensor& B, const c10::optional<at::Tensor>& C0) {
  namespace bg = effikern::bf16_gemm;
  TORCH_CHECK(bg::available(), "bf16_gemm: this CPU has no AVX512-BF16 (or EFFIKERN_CPU_ISA caps it)");
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && A.size(1) == B.size(0), "bf16_gemm: A [M, K] and B [K, N] expected");
  TORCH_CHECK(A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat, "bf16_gemm: fp32 A and B expected");
  const at::Tensor a = A.contiguous(), b = B.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1), K_even = K + K % 2;
  std::vector<uint16_t> a16(M * K_even), b16(K_even / 2 * bg::packed_cols(N) * 2);
  bg::round_rows(a.data_ptr<float>(), M, K, K, K_even, a16.data(), K_even);
  bg::pack_b_rows(b.data_ptr<float>(), K, N, N, b16.data());
  at::Tensor c = C0.has_value() ? C0->to(at::kFloat).contiguous().clone() : at::empty({M, N}, a.options());
  TORCH_CHECK(c.dim() == 2 && c.size(0) == M && c.size(1) == N, "bf16_gemm: C0 [M, N] expected");
  bg::gemm(M, N, K, a16.data(), K_even, b16.data(), c.data_ptr<float>(), N, /*accumulate=*/C0.has_value());
  return c;
}

// Test hooks for half_convert.h, elementwise: fp16 bits (int16) -> float32 and float32 -> fp16 bits, through the
// block functions (F16C where the CPU has it), or the portable scalar ones when `portable` is set.
at::Tensor half_to_float_for_test(const at::Tensor& bits, bool portable) {
  TORCH_CHECK(bits.scalar_type() == at::kShort, "half_to_float_for_test: int16 bits expected");
  const at::Tensor b = bits.contiguous();
  at::Tensor out = at::empty(b.sizes(), b.options().dtype(at::kFloat));
  const auto* src = reinterpret_cast<const uint16_t*>(b.data_ptr<int16_t>());
  float* dst = out.data_ptr<float>();
  namespace hc = effikern::half_convert;
  if (!portable) {
    hc::half_block_to_f32(src, dst, b.numel());
  } else {
    for (int64_t i = 0; i < b.numel(); ++i) dst[i] = hc::half_to_f32(src[i]);
  }
  return out;
}

at::Tensor float_to_half_for_test(const at::Tensor& x, bool portable) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "float_to_half_for_test: float32 expected");
  const at::Tensor v = x.contiguous();
  at::Tensor out = at::empty(v.sizes(), v.options().dtype(at::kShort));
  const float* src = v.data_ptr<float>();
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
  namespace hc = effikern::half_convert;
  if (!portable) {
    hc::f32_block_to_half(src, dst, v.numel());
  } else {
    for (int64_t i = 0; i < v.numel(); ++i) dst[i] = hc::f32_to_half(src[i]);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effikern compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("build_info", &build_info,
        "What this extension was compiled with and can use: {'cuda', 'openmp', 'compiler', 'cpu_bf16_dot'}");
  m.def("half_to_float_for_test", &half_to_float_for_test, "Test hook: half_convert.h, fp16 bits -> float32",
        py::arg("bits"), py::arg("portable") = false);
  m.def("float_to_half_for_test", &float_to_half_for_test, "Test hook: half_convert.h, float32 -> fp16 bits",
        py::arg("x"), py::arg("portable") = false);
  m.def("bf16_gemm_for_test", &bf16_gemm_for_test, "Test hook: bf16_gemm on fp32 A [M, K], B [K, N] (+ C0 [M, N])",
        py::arg("A"), py::arg("B"), py::arg("C0") = py::none());

  m.def("dwsep_bwd_channel_groups_for_test", &effikern::dwsep_bwd_channel_groups_cpu,
        "Test hook: how many channel slices the cpp dwsep backward runs x's backward as on `threads` threads");

  m.def("scratch_cache_held_bytes", &effikern::scratch_cache::held_bytes,
        "Bytes of large scratch blocks kept for reuse by later kernel calls (csrc/cpu/scratch.h)");
  m.def("scratch_cache_release", &effikern::scratch_cache::release_all,
        "Frees the large scratch blocks kept for reuse (csrc/cpu/scratch.h)");

  m.def("empty_output_like", [](const at::Tensor& like) { return effikern::empty_output_like(like); },
        "torch.empty_like(like), advised for transparent huge pages when large (csrc/cpu/output_alloc.h): for CPU "
        "outputs that are written in full", py::arg("like"));

  // Kernels release the GIL: they are long-running and thread-safe, so Python threads may overlap them.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("dwsep_fwd_cpu", &effikern::dwsep_fwd_cpu, release());
  m.def("dwsep_bwd_cpu", &effikern::dwsep_bwd_cpu, release());
  m.def("distill_fwd_cpu", &effikern::distill_fwd_cpu, release());
  m.def("scale_rows_cpu", &effikern::scale_rows_cpu, release());
  m.def("amp_unscale_check_norm_cpu", &effikern::amp_unscale_check_norm_cpu, release());
  m.def("amp_fused_adamw_cpu", &effikern::amp_fused_adamw_cpu, release());
  m.def("amp_fused_sgd_cpu", &effikern::amp_fused_sgd_cpu, release());
  m.def("sparse_csr_fwd_cpu", &effikern::sparse_csr_fwd_cpu, release());
  m.def("sparse_csr_grad_input_rowwise_cpu", &effikern::sparse_csr_grad_input_rowwise_cpu, release());
  m.def("sparse_csr_grad_values_rowwise_cpu", &effikern::sparse_csr_grad_values_rowwise_cpu, release());
  m.def("sparse_bsr_fwd_cpu", &effikern::sparse_bsr_fwd_cpu, release());
  m.def("sparse_bsr_grad_input_cpu", &effikern::sparse_bsr_grad_input_cpu, release());
  m.def("sparse_bsr_grad_values_cpu", &effikern::sparse_bsr_grad_values_cpu, release());
#ifdef EFFIKERN_WITH_CUDA
  m.def("dwsep_fwd_cuda", &effikern::dwsep_fwd_cuda, release());
  m.def("dwsep_bwd_cuda", &effikern::dwsep_bwd_cuda, release());
  m.def("amp_unscale_check_norm_cuda", &effikern::amp_unscale_check_norm_cuda, release());
  m.def("amp_fused_adamw_cuda", &effikern::amp_fused_adamw_cuda, release());
  m.def("amp_fused_sgd_cuda", &effikern::amp_fused_sgd_cuda, release());
  m.def("sparse_csr_fwd_cuda", &effikern::sparse_csr_fwd_cuda, release());
  m.def("sparse_csr_grad_input_cuda", &effikern::sparse_csr_grad_input_cuda, release());
  m.def("sparse_csr_grad_values_cuda", &effikern::sparse_csr_grad_values_cuda, release());
  m.def("sparse_bsr_fwd_cuda", &effikern::sparse_bsr_fwd_cuda, release());
  m.def("sparse_bsr_grad_input_cuda", &effikern::sparse_bsr_grad_input_cuda, release());
  m.def("sparse_bsr_grad_values_cuda", &effikern::sparse_bsr_grad_values_cuda, release());
#endif
}
