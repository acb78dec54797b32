// The element type every CUDA kernel family is instantiated for (its arithmetic is fp32 in all three).
// Plain C++: included by the pure-CUDA kernel headers and, through them, by the torch glue.
#pragma once

namespace effikern {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace cuda
}  // namespace effikern
