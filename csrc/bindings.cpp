// The one binding file of effikern._C: exposes each kernel family's C++ entry points to Python.
// Validation is NOT done here: the torch.library op layer (effikern/ops/*.py) checks every argument once,
// before any of these is called.
#include <torch/extension.h>

#include "cpu/amp_cpu.h"
#include "cpu/distill_cpu.h"
#include "cpu/dwsep_cpu.h"
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
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "effikern compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("build_info", &build_info, "What this extension was compiled with: {'cuda', 'openmp', 'compiler'}");

  // Kernels release the GIL: they are long-running and thread-safe, so Python threads may overlap them.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("dwsep_fwd_cpu", &effikern::dwsep_fwd_cpu, release());
  m.def("dwsep_bwd_cpu", &effikern::dwsep_bwd_cpu, release());
  m.def("distill_fwd_cpu", &effikern::distill_fwd_cpu, release());
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
