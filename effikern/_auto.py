"""What ``auto`` picks, per op, device type and dtype: the backends in order of measured speed.

Only a measurement moves a backend ahead of ``torch`` here, and each entry names the results file it comes
from. A kernel not yet timed on a device, or in a dtype, stays behind PyTorch there. Where one class of
shapes measured the other way, the op names that class (a ``case``) and ``_CASES`` overrides the entry for it.

CPUs come in classes by vector ISA (:func:`cpu_class`), because the kernels and PyTorch's own differ between
them: the ``"cpu"`` entries were measured on an AVX-512 CPU (a 2-core AMD EPYC Zen 4), the ``"cpu-avx2"`` ones
on an AVX2-only AMD EPYC. A CPU of any other class (no AVX2, or not x86) has no measurement and keeps PyTorch.
"""

import functools
from typing import Optional

import torch

_PREFERENCE = {
    # benchmarks/results/dwsep-fp32/cpu-AMD-EPYC-2t.json (2 threads, git 3e71c43, N=8): cpp's geomean over the 12
    # MobileNetV2 / EfficientNet / ConvNeXt shapes is 1.15-1.59x torch in every (layout, mode) group (earlier runs:
    # 1.24-1.65x at 2dd3ba7, 1.17-1.76x at 2154d50, 1.11-1.67x at ff7a76b, 1.20-1.44x at c85bc75, 1.05-1.85x in the
    # all-family cpu-AMD-EPYC-2t.json at b45aafe). It is slower on some shapes, and at N=1 its channels_last
    # forwards are 0.98x (1.00x outside the small-image class below; README).
    ("dwsep_conv2d", "cpu", torch.float32): ("cpp", "torch"),
    # bf16 stays on torch (but see _CASES for backwards). The latest benchmarks/results/dwsep-bf16/cpu-AMD-EPYC-2t.json
    # (git 46b4d15) has cpp at 0.96-0.98x torch for channels_last forwards (slower on 13 of 24) and 1.26-1.76x
    # elsewhere (slower on 6-7 of 24). Its earlier/ run at 2dd3ba7 (2
    # threads, the 12 shapes at N=1 and N=8, bf16 GEMMs in the forward and the channels_last backward)
    # has cpp at 0.95-1.01x torch for channels_last forwards (slower on 14 of 24) and 1.22-1.83x geomean elsewhere,
    # but slower on 5-9 of 24 shapes in those groups too (2154d50: 0.96-1.02x, 13; 1.13-1.90x, 4-8; ff41169:
    # 0.85-0.87x, slower on 21; 1.25-1.36x, 8-10).
    # fp16: benchmarks/results/dwsep-fp16/cpu-AMD-EPYC-2t.json (same shapes and batches, git 6109227): PyTorch has
    # no fast fp16 convolution on this CPU (no AVX512-FP16), and cpp ran 5.8-69x faster in all 96 cases, small
    # images included (6.3-85x at 2154d50, 4.2-81x at b176581).
    ("dwsep_conv2d", "cpu", torch.float16): ("cpp", "torch"),
    # The all-family cpu-AMD-EPYC-2t.json (b45aafe): 5.3x eager over 256 x {32000, 50257} fp32, forward + backward;
    # kd-fp32/cpu-AMD-EPYC-2t.json (010b4ad): 6.0x and 9.6x (earlier/ ea6b82a: 4.2x and 10.2x).
    ("distillation_loss", "cpu", torch.float32): ("cpp", "torch"),
    # benchmarks/results/kd-bf16/cpu-AMD-EPYC-2t.json (2 threads, git 3e22d17, 256 and 1024 tokens x {32000,
    # 50257, 128256}, T 1/2/4, fwd+bwd): cpp 1.93-4.27x the eager formula in all 18 bf16 cases (geomean 3.00x); the
    # torch reference backend 0.27-0.79x (it keeps fp32 intermediates). Earlier runs: 1.37-3.75x, 0.21-0.53x.
    ("distillation_loss", "cpu", torch.bfloat16): ("cpp", "torch"),
    # benchmarks/results/kd-fp16/cpu-AMD-EPYC-2t.json (the same 18 cases in fp16, git ec7f7fb): cpp 1.39-3.08x the
    # eager formula (geomean 2.27x), the torch reference 0.24-0.58x. Earlier runs (earlier/): 1.30-2.63x with
    # scalar fp16 conversions (7598833), 1.23-2.95x with bit-arithmetic ones (28527e2).
    ("distillation_loss", "cpu", torch.float16): ("cpp", "torch"),
    # benchmarks/results/amp/cpu-AMD-EPYC-1t.json (1 thread: the shared 2-core machine gave unrepeatable
    # 2-thread timings): cpp over the torch reference on the same gradients. unscale_check_norm (inside
    # GradScaler.unscale_ with clipping, ResNet-50 and 1000 x 4096 sets): 2.4-5.4x in fp32, fp16 and bf16;
    # fused_adamw_ 11.9x and fused_sgd_ 7.0x (whole scaler step, ResNet-50, fp32; other dtypes not timed).
    ("unscale_check_norm", "cpu", torch.float32): ("cpp", "torch"),
    ("unscale_check_norm", "cpu", torch.float16): ("cpp", "torch"),
    ("unscale_check_norm", "cpu", torch.bfloat16): ("cpp", "torch"),
    ("fused_adamw", "cpu", torch.float32): ("cpp", "torch"),
    ("fused_sgd", "cpu", torch.float32): ("cpp", "torch"),
    # benchmarks/results/sparse/cpu-AMD-EPYC-1t.json (1 thread, provisional: shared machine): the cpp kernels ran
    # 5.8-82x faster than the torch reference backend (which densifies the weight every call) in all 6 cases
    # (4096x4096, 90% unstructured and block 32, 1-64 tokens, forward / grad_input / grad_weight). bf16 and fp16
    # were not timed against the torch backend.
    ("sparse_linear", "cpu", torch.float32): ("cpp", "torch"),
    # benchmarks/results/sparse/cpu-backends-halfprec-1t.json (1 thread, min of 5): cpp against the torch reference
    # in bf16 and fp16, 4096x4096 and 768x3072, unstructured and block 32 at 50% and 90%, 1-64 tokens: forward
    # 2.3-84x (bf16) and 1.1-83x (fp16), forward + backward 2.6-50x and 1.6-32x: faster in all 24 cases of each
    # dtype and pass.
    ("sparse_linear", "cpu", torch.bfloat16): ("cpp", "torch"),
    ("sparse_linear", "cpu", torch.float16): ("cpp", "torch"),
    # --- AVX2-only CPUs (cpu_class() == "avx2"): an AMD EPYC without AVX-512, 2 threads, git 4bdc989, one run each
    # (unless an entry names another run).
    # dwsep fp32, benchmarks/results/dwsep-fp32/cpu-AMD-EPYC-avx2-2t.json: cpp's geomean over the shapes whose output
    # image is larger than 14x14 is 2.11x (NCHW fwd), 2.06x (NCHW fwd+bwd), 1.14x and 1.20x (channels_last), slower
    # on 2, 0, 4 and 4 of 14; the small-image forwards lose as on AVX-512 (_CASES).
    ("dwsep_conv2d", "cpu-avx2", torch.float32): ("cpp", "torch"),
    # dwsep-fp16/cpu-AMD-EPYC-avx2-2t.json (git a36392d, the 12 shapes at N=1 and N=8, both layouts, fwd and fwd+bwd):
    # cpp 2.4-39x torch in all 96 cases (geomeans 7.5-24x per group), small images included, as on AVX-512: PyTorch
    # has no fast fp16 convolution on a CPU without AVX512-FP16.
    ("dwsep_conv2d", "cpu-avx2", torch.float16): ("cpp", "torch"),
    # dwsep-bf16/cpu-AMD-EPYC-avx2-2t.json (git 0d68710, the same 96 cases): cpp 7.1-116x torch in all of them
    # (geomeans 10.7-44x per group). Unlike on AVX-512, PyTorch's bf16 convolutions are slow on this CPU (no native
    # bf16 instructions: the N=8 channels_last forwards took 0.2-0.8 s), so cpp runs every bf16 call here.
    ("dwsep_conv2d", "cpu-avx2", torch.bfloat16): ("cpp", "torch"),
    # kd-fp32/cpu-AMD-EPYC-avx2-2t.json (git de8d204, 18 cases: 256 / 1024 tokens x V 32000 / 50257 / 128256, T
    # 1 / 2 / 4, fwd+bwd): cpp 1.8-19x the eager formula (geomean 6.2x; earlier/ 4bdc989: 5.62x and 7.57x at 256
    # tokens). The compiled formula is not a backend; cpp is slower than it in 5 of 18 (README).
    ("distillation_loss", "cpu-avx2", torch.float32): ("cpp", "torch"),
    # kd-bf16/cpu-AMD-EPYC-avx2-2t.json (git aaa285f; 256 and 1024 tokens x V 32000/50257/128256, T 1/2/4): cpp
    # 2.91-11.1x the eager formula in all 18 cases (geomean 6.20x). The run before the backward's row-scaling fix
    # (earlier/, git b0ea44d) gave 1.52-5.58x (geomean 3.36x).
    ("distillation_loss", "cpu-avx2", torch.bfloat16): ("cpp", "torch"),
    # kd-fp16/cpu-AMD-EPYC-avx2-2t.json (git aaa285f, the same 18 cases): cpp 3.89-11.9x (geomean 7.34x); the
    # torch reference 0.27-0.73x. Before the fix (earlier/, git 925c9fc): 2.70-4.43x.
    ("distillation_loss", "cpu-avx2", torch.float16): ("cpp", "torch"),
    # amp/cpu-AMD-EPYC-avx2-2t.json (git 3ac8cb2, the one-pass AVX2 AdamW/SGD of csrc/cpu/amp_update_simd.cpp):
    # every unscale_check_norm case (ResNet-50 and 1000 x 4096 sets, fp32, fp16, bf16) 4.5-10.9x the torch
    # reference and 1.7-3.5x torch's own GradScaler + clip_grad_norm_. Whole scaler steps on ResNet-50 against
    # torch.optim's fused=True: AdamW 1.08x (fp32), 1.56x (fp16), 1.41x (bf16); SGD 1.16x (fp32). Two more runs of
    # that commit (not kept as results files; this VM is noisy) gave AdamW fp16 1.02x and 1.25x, bf16 1.41x and
    # 1.42x, fp32 1.20-1.33x, SGD fp32 0.95x and 1.13x. On fp16/bf16 params SGD is 8.6x / 13.3x the torch reference
    # (what auto ran otherwise: torch's fused CPU SGD does not update such params, ops/amp_torch_fused.py) and bf16
    # 2.09x torch's foreach SGD. Before the one-pass kernels (earlier/, git d2b96c6) AdamW on fp16/bf16 params was
    # 0.67x / 0.87x torch fused and stayed on torch's kernel; now cpp runs it.
    ("unscale_check_norm", "cpu-avx2", torch.float32): ("cpp", "torch"),
    ("unscale_check_norm", "cpu-avx2", torch.float16): ("cpp", "torch"),
    ("unscale_check_norm", "cpu-avx2", torch.bfloat16): ("cpp", "torch"),
    ("fused_adamw", "cpu-avx2", torch.float32): ("cpp", "torch"),
    ("fused_adamw", "cpu-avx2", torch.float16): ("cpp", "torch"),
    ("fused_adamw", "cpu-avx2", torch.bfloat16): ("cpp", "torch"),
    ("fused_sgd", "cpu-avx2", torch.float32): ("cpp", "torch"),
    ("fused_sgd", "cpu-avx2", torch.float16): ("cpp", "torch"),
    ("fused_sgd", "cpu-avx2", torch.bfloat16): ("cpp", "torch"),
    # sparse/cpu-AMD-EPYC-avx2-2t.json (git 8867d9d; 4096 x 4096, 90%, fp32): cpp 13.6-82x the torch reference in
    # every pass (forward 1-64 tokens warm and cold, block 32, grad_input, grad_weight; its earlier/ run1 12.4-67x).
    # Against torch's CSR matmul (not a backend here) 0.97-2.72x: grad_input is at parity (0.97x; 0.64x in run1).
    # The earlier/ runs of eb115cf: 12.9-74x and 1.42-2.80x; 4bdc989: 7.4-75x and 1.54-3.46x.
    ("sparse_linear", "cpu-avx2", torch.float32): ("cpp", "torch"),
    # sparse/cpu-backends-halfprec-avx2-1t.json (git eb115cf; python -m benchmarks.bench_sparse --backends: 1 thread,
    # min of 5, the 24 cases per dtype of the AVX-512 table): cpp against the torch reference, bf16 1.37-93x forward
    # and 1.83-60x forward + backward, fp16 1.56-90x and 1.54-27x: faster in all 96 (as in the earlier/ run of
    # f4c8209). The run before fp16 weights were widened with F16C (earlier/, git 540f179) had one fp16 forward at
    # 0.60x (768x3072 block-32 50%, 64 tokens).
    ("sparse_linear", "cpu-avx2", torch.bfloat16): ("cpp", "torch"),
    ("sparse_linear", "cpu-avx2", torch.float16): ("cpp", "torch"),
    # No GPU measurement exists yet (the Triton and CUDA kernels are interpreter- and compile-checked only):
    # on CUDA tensors auto keeps PyTorch until a benchmark shows a kernel faster. For dwsep_conv2d and
    # distillation_loss that means the plain eager PyTorch code, not the ops' torch reference backends
    # (functional.py: auto_runs_eager); for the amp ops, PyTorch's fused and foreach kernels (ops/amp_torch_fused.py).
}


# (op, device type, dtype, case) -> backends, overriding _PREFERENCE for that class of calls.
_CASES = {
    # benchmarks/results/cpu-AMD-EPYC-2t.json at b45aafe (2 threads, N=8): on every shape whose output image is
    # 14x14 or smaller (384x14 k3/k7, 672x14, 960x7, 1152x7) the cpp forward took 1.04-1.30x torch's time, in
    # NCHW and in channels_last: oneDNN's depthwise kernel is already fast there and the fused pointwise GEMM is
    # small per tile. The later dwsep-fp32 runs agree on 8 of those 10 (c85bc75) and 9 of 10 (ff7a76b: 1.05-1.17x
    # torch's time); at 2154d50 it is a toss-up, 5 of 10 slower (1.03-1.28x torch's time; the others 0.88-0.97x);
    # the two runs at 2dd3ba7 (N=1 and N=8, 20 such forwards each) have cpp slower on 14 and 11 of 20, and the
    # latest (3e71c43) on 16 of 20, so torch stays. The backward is chosen separately and stays cpp (it won on 3 of
    # those 5 shapes).
    ("dwsep_conv2d", "cpu", torch.float32, "forward_small_image"): ("torch",),
    # bf16 backward, strided or with kernels of 5 or more: benchmarks/results/dwsep-bf16/cpu-AMD-EPYC-2t.json, first
    # measured at ff41169 (2 threads, N=1 and N=8, both layouts), backward alone taken as fwd+bwd minus fwd of the same
    # backend: cpp 1.93x torch (geomean of the 28 cases in the class; 2.2-4.2x at stride 2, up to 7.6x at k5),
    # slower on 3, all at N=1 (ConvNeXt's 384x14 k7 -> 1536: 0.51x NCHW, 0.65x channels_last; 1152x7 k5 NCHW:
    # 0.59x). The run before the bf16 backward GEMM (earlier/, 0dc35dd) gave 1.91x and 5 slower; 2154d50 (grad_x
    # stored once and dW batched) 2.52x, slower on 1 (N=1 384x14 k7 -> 1536 NCHW, 0.78x); 2dd3ba7
    # 2.44x, slower on 2 (that shape at N=1: 0.66x NCHW, 0.88x channels_last); 8405238 2.37x, slower on 2; the
    # current file (46b4d15) 2.49x, slower on 1 (that shape at N=1 NCHW, 0.80x). The other bf16 backwards (stride
    # 1, 3x3) stay on torch: cpp was 0.74x there (slower on 18 of 20; 0.91x, 13 of 20 at 2154d50; 0.99x, 13 of 20
    # at 2dd3ba7; 0.92x, 13 of 20 at 46b4d15), and those calls run as eager PyTorch when the forward stays on torch
    # too (ops/dwsep.py: auto_runs_eager). The bf16 forward stays on torch everywhere.
    ("dwsep_conv2d", "cpu", torch.bfloat16, "backward_strided_or_large_kernel"): ("cpp", "torch"),
    # AVX2-only CPUs: benchmarks/results/dwsep-fp32/cpu-AMD-EPYC-avx2-2t.json (git 4bdc989): the cpp forward of the
    # 10 N=1/N=8 shapes with an output image of 14x14 or less is 0.76x torch (NCHW, slower on 9) and 0.84x
    # (channels_last, slower on 7).
    ("dwsep_conv2d", "cpu-avx2", torch.float32, "forward_small_image"): ("torch",),
}


@functools.lru_cache(maxsize=None)
def cpu_class() -> str:
    """'avx512' on a CPU with AVX-512, else PyTorch's name for its vector ISA in lower case ('avx2', 'default',
    ...): the CPU class whose measurements ``auto`` uses (module docstring)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "avx512" if capability.upper().startswith("AVX512") else capability.lower()


def table_device(device_type: str) -> str:
    """The device key of this process's entries: 'cpu' (AVX-512 CPUs), 'cpu-avx2', ..., or the GPU's type."""
    if device_type != "cpu" or cpu_class() == "avx512":
        return device_type
    return f"cpu-{cpu_class()}"


def preference(op: str, device_type: str, dtype: torch.dtype, case: Optional[str] = None):
    """Backends to try in order; ``torch`` is always the last resort. ``case``: a class of shapes the op
    names (see ``_CASES``), or None."""
    device = table_device(device_type)
    if case is not None and (op, device, dtype, case) in _CASES:
        return _CASES[(op, device, dtype, case)]
    return _PREFERENCE.get((op, device, dtype), ("torch",))


def cases(op: str, device_type: str, dtype: torch.dtype):
    """The shape classes with their own entry for this op, device type and dtype (for ``effikern info``)."""
    device = table_device(device_type)
    return [case for (o, d, t, case) in _CASES if (o, d, t) == (op, device, dtype)]
