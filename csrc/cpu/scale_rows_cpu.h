// out[r, :] = grad[r, :] * scale[r] for half-precision CPU gradients: the distillation loss's backward
// (effikern/ops/distill.py, _scale_rows), where grad is the [rows, V] student gradient the forward saved and
// scale the loss's per-row gradient.
//
// Why a kernel: PyTorch computes a bf16 x float32 product written to a bf16 output through float32 temporaries of
// the output's size (TensorIterator's common dtype). Taken over the whole gradient, that peaked at 250 MiB above the
// forward for a 256 x 128256 bf16 loss, four times the gradient itself; in row chunks (ops/distill.py, the path
// without this kernel) two temporaries of 16 MiB remain per chunk. Here each row is converted, scaled and rounded
// back in 1024-element blocks on the stack: no temporary at all.
#pragma once

#include <ATen/ATen.h>

namespace effikern {

// grad, out: [rows, V] float16 or bfloat16, contiguous, the same dtype (out may be grad itself: in place);
// scale: [rows] float32, contiguous. Each product is taken in float32 and rounded once to nearest even, the bits
// torch.mul(grad, scale[:, None], out=out) gives.
void scale_rows_cpu(const at::Tensor& scale, const at::Tensor& grad, const at::Tensor& out);

}  // namespace effikern
