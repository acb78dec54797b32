"""Triton kernels compile for sm_90 (H100) without a GPU: the interpreter tests check their arithmetic, this
checks that the real compiler accepts them (see tests/triton_compile.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _compile_in_subprocess(args):
    """Runs ``python *args`` with the real compiler (TRITON_INTERPRET unset, FP fusion on as on a GPU run); skips
    without triton, fails on a non-zero exit. Returns its stdout."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=1200, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout


@pytest.mark.triton
def test_triton_kernels_compile_for_sm90():
    assert "OK:" in _compile_in_subprocess([os.path.join(HERE, "triton_compile.py"), "90"])


# The fused GradScaler / optimizer kernels (kernels/amp.py), compiled as their launchers launch them with the
# GPU configuration: each dtype x norm x write-back of the unscale pass, the norm finish, AdamW and SGD
# variants (with a float lr and with a tensor lr), and the unaligned (scalar) path. Aligned launches must use
# 16-byte vector loads and stores.
_AMP_COMPILE = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
from triton_compile import compile_only, _report
import effikern.kernels.amp as amp

for cfg in (amp._UNSCALE_CFG, amp._OPTIM_CFG, amp._FINISH_BLOCK):
    cfg["cpu"] = cfg["cuda"]  # CPU tensors stand in for CUDA ones: compile what a GPU would run
one, zero = torch.ones(()), torch.zeros(())
with compile_only(90) as compiled:
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        grads = [torch.randn(100, dtype=dt), torch.randn(40000, dtype=dt)]
        for norm in (0.0, 2.0, float("inf")):
            amp.unscale_check_norm(grads, one, zero.clone(), norm, norm != 2.0)
        amp.unscale_check_norm(grads, one, zero.clone(), 2.0, True)
        p = [torch.randn(100, dtype=dt)]
        g, m, v = torch.randn(100, dtype=dt), torch.zeros(100, dtype=dt), torch.zeros(100, dtype=dt)
        maximize = dt == torch.float16
        amp.fused_adamw_(p, [g], [m], [v], zero.clone(), 1e-3, 0.9, 0.999, 1e-8, 0.01, maximize, one, zero)
        amp.fused_sgd_(p, [g], [m], zero.clone(), 0.1, 0.9, 0.0, True, 0.01, False, one, zero)
        amp.fused_sgd_(p, [g], [], zero.clone(), 0.1, 0.0, 0.0, False, 0.0, True, None, None)
        # a tensor lr, loaded by the kernels: float32 and float64 storage
        lr32, lr64 = torch.full((), 1e-3), torch.full((1,), 1e-3, dtype=torch.float64)
        amp.fused_adamw_(p, [g], [m], [v], zero.clone(), 0.0, 0.9, 0.999, 1e-8, 0.01, False, one, zero,
                         lr_tensor=lr64 if maximize else lr32)
        amp.fused_sgd_(p, [g], [m], zero.clone(), 0.0, 0.9, 0.0, False, 0.01, False, None, zero,
                       lr_tensor=lr32 if maximize else lr64)
    odd = torch.randn(1001, dtype=torch.float16)[1:]
    amp.unscale_check_norm([odd], one, zero.clone(), 2.0, True)
_report(compiled, True)
unscale = [k for name, k in compiled if name == "_unscale_check_norm_kernel"]
assert len(unscale) == 13, len(unscale)
assert all(".v4." in k.asm["ptx"] for k in unscale[:-1]), "aligned unscale launch without 16-byte accesses"
assert all(".v4." in k.asm["ptx"] for name, k in compiled if name in ("_adamw_kernel", "_sgd_kernel")), \
    "aligned optimizer launch without 16-byte accesses"
print(f"OK: {len(compiled)} amp launches compiled to cubin")
"""


@pytest.mark.triton
def test_amp_triton_kernels_compile_for_sm90():
    assert "OK:" in _compile_in_subprocess(["-c", _AMP_COMPILE, HERE])


def compile_sparse_kernels(arch=90):
    """Compile every sparse kernel (kernels/sparse.py) as its launcher launches it, for sm_<arch>: BSR
    forward, grad_input and grad_values for blocks 8 (padded to 16) /16/32/64 in fp16 and a 32 block in bf16
    and fp32 (300 tokens: the 128-token tiles); CSR forward, grad_input and grad_values at 1, 16 and 64 tokens
    (each tile shape) in each dtype, on a 1000 x 4096 weight (16 column panels, 4 row panels).
    Fails on a register spill. Run in a subprocess by the test below (needs TRITON_INTERPRET unset).
    Returns the number of launches compiled."""
    import torch
    from effikern.kernels import sparse as ks
    from triton_compile import _report, compile_only, resource_usage

    N, K = 200, 250
    i32 = dict(dtype=torch.int32)
    with compile_only(arch) as compiled:
        per_dtype = ((torch.float16, (8, 16, 32, 64)), (torch.bfloat16, (32,)), (torch.float32, (32,)))
        for dtype, blocks in per_dtype:
            for B in blocks:
                nbr, nbc = -(-N // B), -(-K // B)
                # One block per block row, all in block column 0: enough structure for a real launch.
                crow, row = torch.arange(nbr + 1, **i32), torch.arange(nbr, **i32)
                col = torch.zeros(nbr, **i32)
                t_crow = torch.full((nbc + 1,), nbr, **i32)
                t_crow[0] = 0
                vals = torch.randn(nbr, B, B, dtype=dtype)
                x, gy = torch.randn(300, K, dtype=dtype), torch.randn(300, N, dtype=dtype)
                ks.bsr_fwd(x, crow, col, vals, torch.randn(N, dtype=dtype), N, K)
                ks.bsr_grad_input(gy, t_crow, row, row, vals, N, K)
                ks.bsr_grad_values(gy, x, row, col, tuple(vals.shape))
            # Panelled CSR with one entry per row, in column 0: segment n*P holds row n's, and in the
            # transposed view segment q of column 0 holds rows q*256 .. q*256+255. Several panels each way,
            # as real weights have (P = 1 would compile a kernel specialised for an argument equal to 1);
            # P = 16 gives the one-token forward its widest step, 16 panels of 4 rows.
            Nc, Kc = 1000, 4096
            P, Pn = -(-Kc // 256), -(-Nc // 256)
            seg = torch.arange(Nc, **i32) * P
            crow = torch.searchsorted(seg, torch.arange(Nc * P + 1, **i32)).to(torch.int32)
            col, t_row = torch.zeros(Nc, dtype=torch.uint8), (torch.arange(Nc) % 256).to(torch.uint8)
            t_crow = torch.full((Kc * Pn + 1,), Nc, **i32)
            t_crow[:Pn + 1] = torch.arange(Pn + 1, **i32).mul(256).clamp(max=Nc)
            vals, perm = torch.randn(Nc, dtype=dtype), torch.arange(Nc, **i32)
            for M in (1, 16, 64):
                x, gy = torch.randn(M, Kc, dtype=dtype), torch.randn(M, Nc, dtype=dtype)
                ks.csr_fwd(x, crow, col, vals, torch.randn(Nc, dtype=dtype) if M == 1 else None, Nc, Kc)
                ks.csr_grad_input(gy, t_crow, t_row, perm, vals, Nc, Kc)
                ks.csr_grad_values(gy, x, seg, col)
    for name, kernel in _report(compiled, verbose=True):
        usage = resource_usage(kernel)  # None where cuobjdump is missing: nothing to check then
        assert usage is None or "STACK:0" in usage, f"{name}: spills registers ({usage})"
    return len(compiled)


@pytest.mark.triton
def test_sparse_triton_kernels_compile_for_sm90():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_triton_kernels_compile as t; "
            "print('OK:', t.compile_sparse_kernels(90), 'launches')")
    assert "OK: 45 launches" in _compile_in_subprocess(["-c", code, HERE])
