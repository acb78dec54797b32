// Helpers every torch-side CUDA glue file (csrc/cuda/*_cuda.cpp) needs: the stream handed over from Python, the
// launch error check, and the kernels' element type of a tensor. Host code against <torch/extension.h> only, as
// the glue files are (see any of them for why).
#pragma once

#include <torch/extension.h>

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace effikern {
namespace glue {

/// The stream the op layer passes as an integer (torch's current stream, ``cuda_stream``).
inline cudaStream_t as_stream(int64_t stream) {
  return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream));
}

/// Raises "effikern <family> CUDA kernel failed: <error><hint>" unless err is cudaSuccess.
inline void check_launch(cudaError_t err, const char* family, const char* hint = "") {
  TORCH_CHECK(err == cudaSuccess, "effikern ", family, " CUDA kernel failed: ", cudaGetErrorString(err), hint);
}

/// The kernels' DType of t; raises for any other dtype, naming the family.
inline cuda::DType kernel_dtype(const at::Tensor& t, const char* family) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "effikern ", family, " CUDA: dtype must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

}  // namespace glue
}  // namespace effikern
