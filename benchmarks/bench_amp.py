"""Fused loss scaling against torch.amp.GradScaler, on gradient sets shaped like real models.

Two modes:
- ``unscale+clip``: unscale, inf/nan check, total grad norm and clip (max_norm=1) of one gradient set.
  Baseline ``torch``: ``torch._amp_foreach_non_finite_check_and_unscale_`` (GradScaler.unscale_'s kernel; the
  public unscale_ refuses fp16 grads) + ``clip_grad_norm_(foreach=True)`` + ``found_inf.item()`` (step's
  sync). effikern: ``GradScaler.unscale_(opt, max_norm=1)`` with a plain SGD optimizer, i.e. the grads end
  unscaled and clipped in memory like torch's: a read-only pass, then one multiply by clip/scale.
- ``step``: scale update + AdamW (or SGD with momentum) over fp32 params and grads (no inf; ResNet-50 also with
  fp16 and bf16 params). Baselines: torch GradScaler with ``AdamW/SGD(fused=True)`` (and foreach; for fp16/bf16
  SGD on CPU foreach alone, since torch's fused CPU SGD does not update them there); effikern: its GradScaler +
  effikern.optim.AdamW/SGD (1/scale folded in) on each backend, and ``effikern-auto`` where auto picks no effikern
  kernel (it runs torch's fused kernel then: effikern/ops/amp_torch_fused.py).

Gradient sets: GPT-2 124M (148 tensors), BERT-large (335M, 391), ResNet-50 (25.6M, 161) and a synthetic grid
(tensors x elements); fp32, fp16 and bf16; no inf, or one inf in the last tensor. CPU quick mode uses
ResNet-50 and a small grid only (the whole family in well under a minute on 2 cores).

``report()`` adds, per candidate, the bytes each step moves per gradient element and the host syncs it makes
(counted: calls that read a tensor's value on the host).
"""

import contextlib
import math

import torch

import effikern

from .runner import Case

FAMILY = "amp"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_NORM = 1.0


# --- gradient sets --------------------------------------------------------------------------------------

def gpt2_124m():
    """148 shapes: wte, wpe, 12 blocks of (ln_1, attn c_attn / c_proj, ln_2, mlp c_fc / c_proj) w+b, ln_f."""
    d, shapes = 768, [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp
    return shapes + [(d,), (d,)]


def bert_large():
    """391 shapes: embeddings (3 tables + LayerNorm), 24 layers of 16 tensors, pooler."""
    d, shapes = 1024, [(30522, 1024), (512, 1024), (2, 1024), (1024,), (1024,)]
    for _ in range(24):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    return shapes + [(d, d), (d,)]


def resnet50():
    """161 shapes: 53 convs + 53 batch norms (weight, bias) + fc."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            convs = [(width, cin, 1, 1), (width, width, 3, 3), (width * 4, width, 1, 1)]
            if b == 0:
                convs.append((width * 4, cin, 1, 1))  # the downsample projection
            for c in convs:
                shapes += [c, (c[0],), (c[0],)]
            cin = width * 4
    return shapes + [(1000, 2048), (1000,)]


def grid(tensors, elems):
    return [(elems,)] * tensors


def _sets(device, quick):
    if device.type == "cpu" and quick:
        return {"resnet50": resnet50(), "grid1000x4096": grid(1000, 4096)}
    sets = {"gpt2-124m": gpt2_124m(), "bert-large": bert_large(), "resnet50": resnet50()}
    counts = (10, 1000, 10000) if quick else (10, 100, 1000, 10000)
    sizes = (4, 4096, 65536) if quick else (4, 256, 4096, 65536)
    for n in counts:
        for e in sizes:
            if n * e <= 2**28:
                sets[f"grid{n}x{e}"] = grid(n, e)
    return sets


def _numel(shapes):
    return sum(math.prod(s) for s in shapes)


def _params(shapes, dtype, device, inf_last=False):
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype, device=device).normal_(0, 0.02))
        p.grad = torch.empty(s, dtype=dtype, device=device).normal_(0, 1.0)
        params.append(p)
    if inf_last:
        params[-1].grad.view(-1)[-1] = math.inf
    return params


# --- candidates -----------------------------------------------------------------------------------------

def _torch_unscale_clip(params, device):
    grads = [p.grad for p in params]
    inv = torch.ones((), device=device)  # scale 1: repeated runs keep the same gradients
    found = torch.zeros((), device=device)

    def run():
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        return found.item()  # what GradScaler.step does before a non-fused optimizer

    return run


def _ours_unscale_clip(params, device, backend):
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = effikern.amp.GradScaler(device.type, init_scale=1.0)
    scaler.scale(torch.ones((), device=device))

    def run():
        with effikern.set_backend(backend):
            scaler.unscale_(opt, max_norm=MAX_NORM)
        found = sum(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values()).item()
        scaler.update(1.0)  # keeps the scale at 1 and resets the per-step state
        return found

    return run


def _step_candidate(params, device, scaler_cls, opt_fn, backend=None):
    opt = opt_fn(params)
    scaler = scaler_cls(device.type, init_scale=1.0, growth_interval=10**9)

    def run():
        ctx = effikern.set_backend(backend) if backend else contextlib.nullcontext()
        with ctx:
            scaler.scale(torch.ones((), device=device))
            scaler.step(opt)
            scaler.update()

    return run


def _available(backend, device):
    return effikern.backends.unavailable_reason(backend, device.type)


def _our_backends(device):
    return ("torch", "cpp") if device.type == "cpu" else ("triton", "cuda")


def _unscale_case(device, name, shapes, dtype_name, inf_last):
    dtype = DTYPES[dtype_name]
    n = _numel(shapes)
    esize = torch.finfo(dtype).bits // 8

    def build():
        params = _params(shapes, dtype, device, inf_last)
        out = {"torch": _torch_unscale_clip(params, device)}
        for b in _our_backends(device):
            why = _available(b, device)
            out[f"effikern-{b}"] = f"unavailable: {why}" if why else _ours_unscale_clip(params, device, b)
        if effikern.backends.choose("unscale_check_norm", device.type, dtype) == "torch":
            out["effikern-auto"] = _ours_unscale_clip(params, device, "auto")  # torch's foreach kernels then
        return out

    # Compulsory: the norm needs every grad read before any can be clipped; then read + write to apply.
    return Case(op="unscale+clip", shape=f"{name} {len(shapes)}t {n / 1e6:.1f}M",
                dtype=dtype_name, layout="inf-last" if inf_last else "finite", mode="step",
                bytes=3 * esize * n, flops=4 * n, baseline="torch", build=build)


OPTIMIZERS = {
    # name: (torch class, effikern class, kwargs, compulsory bytes per fp32 param: the check's read of g, then
    # the optimizer's reads and writes)
    "adamw": (torch.optim.AdamW, lambda: effikern.optim.AdamW, dict(lr=1e-4), 8 * 4),
    "sgd": (torch.optim.SGD, lambda: effikern.optim.SGD, dict(lr=1e-4, momentum=0.9), 6 * 4),
}


def _torch_fused_broken(optimizer, dtype, device):
    """Why torch's fused kernel cannot be timed here, or None: its CPU SGD leaves fp16/bf16 params unchanged in
    torch <= 2.13 (pytorch/pytorch#191763; effikern/ops/amp_torch_fused.py probes it)."""
    from effikern.ops import amp_torch_fused

    if optimizer == "sgd" and not amp_torch_fused.sgd_kernel_works(device, dtype):
        return "torch's CPU fused SGD does not update fp16/bf16 params in this torch (pytorch#191763)"
    return None


def _step_case(device, name, shapes, optimizer, dtype_name="fp32"):
    dtype = DTYPES[dtype_name]
    n = _numel(shapes)
    torch_cls, ours_cls, kwargs, per_param = OPTIMIZERS[optimizer]
    broken = _torch_fused_broken(optimizer, dtype, device)

    def build():
        params = _params(shapes, dtype, device)
        out = {}
        for label, fused in (("torch-fused", True), ("torch-foreach", False)):
            if fused and broken:
                out[label] = f"unavailable: {broken}"
                continue
            try:
                fn = (lambda ps, f=fused: torch_cls(ps, **kwargs, fused=f, foreach=None if f else True))
                fn([torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))])
                run = _step_candidate(params, device, torch.amp.GradScaler, fn)
                run()  # torch's GradScaler refuses to unscale fp16 grads for a non-fused optimizer: found here
                out[label] = run
            except (RuntimeError, ValueError) as err:
                out[label] = f"unavailable: {err}"
        for b in _our_backends(device):
            why = _available(b, device)
            out[f"effikern-{b}"] = f"unavailable: {why}" if why else _step_candidate(
                params, device, effikern.amp.GradScaler, lambda ps: ours_cls()(ps, **kwargs), b)
        if effikern.backends.choose(f"fused_{optimizer}", device.type, dtype) == "torch":
            # what auto runs where no effikern kernel is measured faster: torch's fused kernel (or the reference)
            out["effikern-auto"] = _step_candidate(params, device, effikern.amp.GradScaler,
                                                   lambda ps: ours_cls()(ps, **kwargs), "auto")
        return out

    # The fp32 baseline is torch's fused optimizer; where that is broken (fp16/bf16 SGD on CPU), torch's foreach one.
    baseline = "torch-foreach" if broken else "torch-fused"
    esize = torch.finfo(dtype).bits // 8
    return Case(op=f"scaler+{optimizer}", shape=f"{name} {len(shapes)}t {n / 1e6:.1f}M", dtype=dtype_name,
                layout="finite", mode="step", bytes=per_param // 4 * esize * n, flops=16 * n, baseline=baseline,
                build=build)


def cases(device, quick=True):
    """unscale+clip for every set x dtype x {finite, inf in the last tensor}, and the whole step (fp32 params; on
    the ResNet-50 set also fp16 and bf16 params, as in pure half-precision training)."""
    out = []
    for name, shapes in _sets(device, quick).items():
        for dtype_name in DTYPES:
            for inf_last in (False, True):
                out.append(_unscale_case(device, name, shapes, dtype_name, inf_last))
        if not name.startswith("grid") or (device.type != "cpu" and not quick):
            step_dtypes = DTYPES if name == "resnet50" else ("fp32",)
            out += [_step_case(device, name, shapes, opt, d) for opt in OPTIMIZERS for d in step_dtypes]
    return out


# --- syncs and bytes per step ---------------------------------------------------------------------------

@contextlib.contextmanager
def _count_host_reads():
    """Counts Tensor.item / __bool__ / tolist calls (each is a host sync on a GPU tensor)."""
    counter = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist")}

    def wrap(fn):
        def counted(self, *a, **k):
            counter["n"] += 1
            return fn(self, *a, **k)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def report(quick=True):
    """Host syncs and gradient bytes per step of each way of doing a scaled, clipped AdamW step (fp32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    shapes = grid(8, 1024)
    plans = {
        "torch GradScaler + clip_grad_norm_ + AdamW(foreach)":
            ("torch", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        "torch GradScaler + clip_grad_norm_ + AdamW(fused)":
            ("torch", lambda ps: torch.optim.AdamW(ps, fused=True)),
        "effikern GradScaler.unscale_(max_norm) + torch AdamW(foreach)":
            ("ours", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        "effikern GradScaler.unscale_(max_norm) + torch AdamW(fused)":
            ("ours", lambda ps: torch.optim.AdamW(ps, fused=True)),
        "effikern GradScaler.unscale_(max_norm) + effikern AdamW":
            ("ours", lambda ps: effikern.optim.AdamW(ps)),
    }
    # Gradient bytes per element and step, in units of the grad's size (read = 1, read + write = 2), scaler
    # and clip only (the optimizer's own read of the grad is the same for all and not counted).
    grad_traffic = {
        "torch GradScaler + clip_grad_norm_ + AdamW(foreach)": 5,
        "torch GradScaler + clip_grad_norm_ + AdamW(fused)": 5,
        "effikern GradScaler.unscale_(max_norm) + torch AdamW(foreach)": 3,
        "effikern GradScaler.unscale_(max_norm) + torch AdamW(fused)": 1,
        "effikern GradScaler.unscale_(max_norm) + effikern AdamW": 1,
    }
    for label, (who, opt_fn) in plans.items():
        try:
            params = _params(shapes, torch.float32, device)
            opt = opt_fn(params)
        except (RuntimeError, ValueError) as err:
            rows.append({"plan": label, "note": f"unavailable: {err}"})
            continue
        scaler = (torch.amp.GradScaler if who == "torch" else effikern.amp.GradScaler)(device.type)
        for i in range(2):  # the second step is counted (the first allocates optimizer state)
            with _count_host_reads() as syncs:
                scaler.scale(torch.ones((), device=device))
                if who == "torch":
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
                else:
                    scaler.unscale_(opt, max_norm=MAX_NORM)
                scaler.step(opt)
                scaler.update()
        rows.append({"plan": label, "host_syncs_per_step": syncs["n"],
                     "grad_bytes_per_element_scaler_and_clip": f"{grad_traffic[label]} x grad size"})
    return rows
