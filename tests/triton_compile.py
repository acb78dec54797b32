"""Compile effikern's Triton kernels for a CUDA GPU on a machine that has none (used by
tests/test_triton_kernels_compile.py; also runnable: ``python tests/triton_compile.py [ARCH]``).

Every ``kernel[grid](...)`` launch made inside ``compile_only()`` goes through Triton's own JIT path (the same
argument specialization as a real launch: dtypes, 16-byte alignment, ints equal to 1) for the chosen CUDA
target, down to PTX and a cubin from the ptxas bundled with Triton, and launches nothing. The launchers run
unchanged on CPU tensors, so this compiles exactly what they would launch. It catches what the interpreter
accepts and the compiler rejects (non-constexpr globals, register spills), though only with the installed
Triton version.

Needs a process where TRITON_INTERPRET is unset (the interpreter replaces @triton.jit functions at import).
"""
import contextlib
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction


class _CompileOnlyDriver:
    """Just enough of a Triton driver for JITFunction to pick a target; it never launches."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch=90, warp_size=32):
    """Inside this context every @triton.jit launch compiles for cuda sm_<arch> instead of running.

    Yields a list that collects (kernel name, CompiledKernel) per launch; CompiledKernel.asm holds
    "ttir", "ttgir", "llir", "ptx" and "cubin"."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile checks need TRITON_INTERPRET unset"
    compiled = []
    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, kernel))
        return kernel

    driver = triton.runtime.driver
    previous = driver._active  # reset_active() would fail: a GPU-less machine has no driver
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, warp_size)))
    JITFunction.run = run
    try:
        yield compiled
    finally:
        JITFunction.run = original_run
        driver.set_active(previous)


def resource_usage(kernel):
    """'REG:n STACK:n SHARED:n ...' of a compiled kernel's cubin from Triton's bundled cuobjdump
    (spills show as STACK > 0); None where that tool cannot be found."""
    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except AttributeError:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
    return next((ln.split("Resource usage:")[-1].strip() for ln in out.stdout.splitlines() if "REG:" in ln), None)


def check_dwsep(arch=90, verbose=True):
    """Compile the dwsep kernels as the launchers launch them, for sm_<arch>: every dtype x layout
    pair once (6 pairs, each with a different activation, so all 6 activations compile), biases
    and residual on for half of them, plus fp32 with TF32 off (the IEEE dot). Returns the list of
    (name, CompiledKernel)."""
    from effikern.kernels.dwsep import dwsep_bwd_triton, dwsep_fwd_triton

    N, C, Cout, H, W, k = 2, 24, 40, 9, 9, 3
    conv = ((1, 1), (1, 1), (1, 1))
    pairs = [(dt, cl) for dt in (torch.float32, torch.float16, torch.bfloat16) for cl in (False, True)]
    with compile_only(arch) as compiled:
        for act, (dtype, cl) in enumerate(pairs):
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
            dw_w, pw_w = torch.randn(C, 1, k, k, dtype=dtype), torch.randn(Cout, C, 1, 1, dtype=dtype)
            g = torch.randn(N, Cout, H, W, dtype=dtype)
            on = act % 2 == 0
            dw_b = torch.randn(C, dtype=dtype) if on else None
            pw_b = torch.randn(Cout, dtype=dtype) if on else None
            dwsep_fwd_triton(x, dw_w, dw_b, pw_w, pw_b, *conv, act, g if on else None)
            dwsep_bwd_triton(g, x, dw_w, dw_b, pw_w, *conv, act)
        allow = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            x = torch.randn(N, C, H, W)
            dwsep_fwd_triton(x, torch.randn(C, 1, k, k), None, torch.randn(Cout, C, 1, 1), None, *conv, 4, None)
        finally:
            torch.backends.cudnn.allow_tf32 = allow
    return _report(compiled, verbose)


def check_distill(arch=90, verbose=True):
    """Compile the distillation kernel for sm_<arch>: each dtype, with and without target and gradient."""
    from effikern.kernels.distill import distill_fwd_triton

    with compile_only(arch) as compiled:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for has_target in (False, True):
                s, t = torch.randn(4, 5000, dtype=dtype), torch.randn(4, 5000, dtype=dtype)
                target = torch.randint(0, 5000, (4,)) if has_target else None
                distill_fwd_triton(s, t, target, 2.0, 0.5, 0.5, -100, has_target)
    return _report(compiled, verbose)


def _report(compiled, verbose):
    for name, kernel in compiled:
        assert kernel.asm.get("cubin"), f"{name}: no cubin"
        if verbose:
            print(f"{name:32s} {kernel.metadata.num_warps} warps  {resource_usage(kernel)}")
    return compiled


if __name__ == "__main__":
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    compiled = check_dwsep(arch) + check_distill(arch)
    print(f"OK: {len(compiled)} launches compiled to cubin for sm_{arch} with triton {triton.__version__}")
