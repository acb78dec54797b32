"""Fused knowledge-distillation loss against the eager PyTorch formula, forward + backward.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target)

Shapes: tokens x vocabulary of LLM distillation, V = 32000 (Llama 2), 50257 (GPT-2), 128256 (Llama 3); 10% of
the targets ignored (padding); mean reduction; the step is the loss and the student's gradient.
CPU: the eager formula (baseline) and ``torch.compile`` of it vs the ``torch`` and ``cpp`` backends. GPU: the
eager formula (baseline), ``torch.compile`` of it, and the ``triton`` backend. The fused kernel runs twice: as the
default (``inplace_backward=False``) and as ``<backend>_inplace`` (``inplace_backward=True``). The runner also reports
peak memory (GPU: the allocator's peak; CPU: peak resident memory, timing.cpu_peak_extra_mib): the eager formula
keeps several [tokens, V] float tensors alive for backward, the fused op the gradient it saves and, by default,
in backward its copy scaled by the loss's gradient (scaled in place with ``inplace_backward=True``).
"""

import torch
import torch.nn.functional as F

import effikern

from .runner import Case

FAMILY = "kd"

VOCABS = (32000, 50257, 128256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURES = (1.0, 2.0, 4.0)
ALPHA = 0.5
IGNORED = 0.1  # fraction of tokens whose target is ignore_index
# Arithmetic per logit, roughly: 6 exps (3 per pass) counted as one flop each, plus ~14 multiplies and adds.
FLOPS_PER_LOGIT = 20


def _matrix(device, quick):
    """(tokens, V, dtype, T) combinations to run on this device."""
    if device.type == "cpu":
        if quick:
            return [(256, v, "fp32", 2.0) for v in VOCABS[:2]]
        # 8192 x 128256 is 4 GiB per float tensor: the eager baseline would need tens of GiB and minutes a step
        # on CPU, so the CPU matrix stops at 1024 tokens.
        return [(n, v, d, t) for n in (256, 1024) for v in VOCABS for d in DTYPES for t in TEMPERATURES]
    if quick:
        return [(8192, 128256, "bf16", 2.0), (8192, 32000, "bf16", 2.0), (1024, 128256, "fp32", 2.0)]
    return [(n, v, d, t) for n in (1024, 8192) for v in VOCABS for d in DTYPES for t in TEMPERATURES]


def eager_formula(s, t, y, temperature, alpha, ignore_index=-100):
    """What a user writes today (mean over non-ignored tokens); autograd does the backward."""
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="none").sum(-1)
    counted = y != ignore_index
    soft = (kl * counted).sum() / counted.sum().clamp(min=1)
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(s, y, ignore_index=ignore_index)


def _candidates(device):
    """{label: (backend, inplace_backward) or None for the plain formula}, baseline label."""
    if device.type == "cpu":  # torch.compile (inductor's C++ backend) is the second baseline here too
        return {"eager": None, "compile": None, "torch": ("torch", False), "cpp": ("cpp", False),
                "cpp_inplace": ("cpp", True)}, "eager"
    return {"eager": None, "compile": None, "triton": ("triton", False), "triton_inplace": ("triton", True)}, "eager"


def _compiled_formula():
    # One graph per shape (dynamic=False, what a user with fixed shapes gets), and room for every case's
    # recompile: past dynamo's default limit it would fall back to eager and the "compile" rows would be eager's.
    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    return torch.compile(eager_formula, dynamic=False)


def _make_case(device, tokens, vocab, dtype_name, temperature):
    dtype = DTYPES[dtype_name]
    esize = torch.finfo(dtype).bits // 8
    # Compulsory traffic: student and teacher read once, the student's gradient written once, the targets read.
    nbytes = 3 * tokens * vocab * esize + 8 * tokens
    labels, baseline = _candidates(device)

    def build():
        s = torch.randn(tokens, vocab, device=device, dtype=dtype, requires_grad=True)
        t = torch.randn(tokens, vocab, device=device, dtype=dtype)
        y = torch.randint(0, vocab, (tokens,), device=device)
        y[torch.rand(tokens, device=device) < IGNORED] = -100
        out = {}
        for label, fused_as in labels.items():
            if fused_as is None:
                loss_fn = _compiled_formula() if label == "compile" else eager_formula
                out[label] = _step(lambda loss_fn=loss_fn: loss_fn(s, t, y, temperature, ALPHA), s)
                continue
            backend, inplace = fused_as
            if why := effikern.backends.unavailable_reason(backend, device.type):
                out[label] = f"unavailable: {why}"
                continue
            fused = _step(lambda inplace=inplace: effikern.functional.distillation_loss(
                s, t, y, temperature, ALPHA, inplace_backward=inplace), s)
            out[label] = _under_backend(backend, fused)
        return out

    return Case(op="distillation_loss", shape=f"{tokens}x{vocab} T{temperature:g}", dtype=dtype_name,
                layout="-", mode="fwd+bwd", bytes=nbytes, flops=FLOPS_PER_LOGIT * tokens * vocab,
                baseline=baseline, build=build)


def _step(loss_fn, student):
    def run():
        return torch.autograd.grad(loss_fn(), student)

    return run


def _under_backend(backend, step):
    # The whole step, backward included, runs under the chosen backend.
    def run():
        with effikern.set_backend(backend):
            return step()

    return run


def cases(device, quick=True):
    """Every (tokens, V, dtype, T) case for this device."""
    return [_make_case(device, n, v, d, t) for (n, v, d, t) in _matrix(device, quick)]
