"""What the Triton kernels that multiply matrices share: the dtype map, the interpreter check, and ``mma``
(tl.dot with the operand rounding and the interpreter's bf16 workaround) with the constexprs it takes."""

import os

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True under the Triton interpreter. Not inferred from the device: the sm_90 compile check
    (tests/triton_compile.py) launches on CPU tensors and must compile the GPU configuration."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def mma(acc, a, b, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr):
    """acc += a @ b with operands rounded to DOT_DTYPE and fp32 accumulation.

    EMULATE (set only for bf16 under the interpreter, whose tl.dot multiplies bf16 bit patterns as
    integers) rounds to DOT_DTYPE and multiplies in fp32: the same numbers a bf16 MMA produces."""
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if EMULATE:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


def tf32_allowed(legacy, precisions, default: bool) -> bool:
    """Whether a torch TF32 flag is on: ``legacy()`` (an ``allow_tf32``) or, where reading it raises, the first of
    ``precisions`` (getters of ``fp32_precision`` settings, the flag's own first, then those it inherits from) that
    is not "none": "tf32" or "ieee"; all "none": ``default``, the legacy flag's default. torch (seen with 2.13)
    raises on the legacy read once the newer ``fp32_precision`` API has set a flag
    (``torch.backends.cuda.matmul.fp32_precision = "tf32"``: "you have used mix of the legacy and new APIs"),
    which would otherwise fail every launch."""
    try:
        return bool(legacy())
    except RuntimeError:
        for precision in precisions:
            value = precision()
            if value != "none":
                return value == "tf32"
        return default


def dot_args(x: torch.Tensor, allow_tf32: bool) -> dict:
    """Constexprs for ``mma`` on operands of x's dtype: DOT_DTYPE, DOT_PREC ("tf32" when ``allow_tf32``, the
    flag the PyTorch op being replaced obeys, else "ieee"), EMULATE."""
    dot_dtype = TL_DTYPE[x.dtype]
    return dict(DOT_DTYPE=dot_dtype, DOT_PREC="tf32" if allow_tf32 else "ieee",
                EMULATE=interpreting() and dot_dtype == tl.bfloat16)
