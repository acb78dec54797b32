"""effikern.nn.DepthwiseSeparableConv2d against the two-conv PyTorch module it replaces.

Oracle (DESIGN.md): the reference computed in float64; effikern's error may be at most twice PyTorch's own
error in the test dtype, plus a roundoff floor (ROUNDOFF) relative to the result's scale.
"""

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

from effikern.nn import DepthwiseSeparableConv2d

ACTIVATIONS = {None: nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU,
               "hardswish": nn.Hardswish}


class TwoConv(nn.Module):
    """The usual unfused module: same child names, so the checkpoints are interchangeable."""

    def __init__(self, c, cout, kernel_size, stride=1, padding=0, dilation=1, bias=True, activation=None):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, stride, padding, dilation, groups=c, bias=bias)
        self.pointwise = nn.Conv2d(c, cout, 1, bias=bias)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x):
        return self.pointwise(self.act(self.depthwise(x)))


# Floor under the 2x rule, relative to the result's scale. In float64 PyTorch's own error is 0 by
# definition, but a kernel that sums the same few hundred terms in another order differs by ~1e-14
# (seen: 1.6e-14); a real bug shows as > 1e-6.
ROUNDOFF = {torch.float64: 1e-12, torch.float32: 4 * torch.finfo(torch.float32).eps}


def assert_oracle(got, torch_low, oracle):
    """got, torch_low: effikern's and PyTorch's results in the test dtype; oracle: PyTorch in float64."""
    assert got.shape == oracle.shape and got.dtype == torch_low.dtype
    err = (got.double() - oracle).abs().max().item()
    torch_err = (torch_low.double() - oracle).abs().max().item()
    bound = 2 * torch_err + ROUNDOFF[got.dtype] * max(oracle.abs().max().item(), 1.0)
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g} (PyTorch's own error {torch_err:.3g})"


def run(module, x, grad_out):
    """Output and gradients w.r.t. x and every parameter (by state_dict name) of ``module(x)``."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    grads = {name: p.grad for name, p in module.named_parameters()}
    return y, x.grad, grads


# (C, Cout, kernel, stride, padding, dilation, bias, activation, H, W, channels_last)
CONFIGS = [
    *[(3, 5, 3, 1, 1, 1, True, act, 7, 7, False) for act in ACTIVATIONS],
    (4, 6, 3, 1, 1, 1, False, "relu6", 9, 9, False),
    (5, 7, 5, 2, 2, 1, True, "silu", 13, 13, False),
    (6, 4, 3, 1, 2, 2, True, "gelu", 11, 10, False),
    (3, 8, (3, 5), (2, 1), (1, 2), 1, True, "hardswish", 13, 7, False),
    (17, 9, 3, 2, 1, 1, True, "relu", 12, 12, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_matches_two_conv_module(config, dtype):
    c, cout, k, stride, padding, dilation, bias, act, h, w, channels_last = config
    ours = DepthwiseSeparableConv2d(c, cout, k, stride, padding, dilation, bias=bias, activation=act,
                                    dtype=dtype)
    reference = TwoConv(c, cout, k, stride, padding, dilation, bias, act).to(dtype)
    reference.load_state_dict(ours.state_dict(), strict=True)
    oracle = copy.deepcopy(reference).double()
    x = torch.randn(2, c, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    with torch.no_grad():
        grad_out = torch.randn_like(reference(x))
    y, gx, grads = run(ours, x, grad_out)
    y_ref, gx_ref, grads_ref = run(reference, x, grad_out)
    y64, gx64, grads64 = run(oracle, x.double(), grad_out.double())

    assert_oracle(y, y_ref, y64)
    assert_oracle(gx, gx_ref, gx64)
    assert set(grads) == set(grads64) == {f"{m}.{p}" for m in ("depthwise", "pointwise")
                                          for p in (("weight", "bias") if bias else ("weight",))}
    for name in grads:
        assert_oracle(grads[name], grads_ref[name], grads64[name])
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_interchangeable_with_two_conv_module(bias):
    theirs = TwoConv(6, 10, 3, padding=1, bias=bias, activation="relu")
    ours = DepthwiseSeparableConv2d(6, 10, 3, padding=1, bias=bias, activation="relu")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 6, 8, 8, dtype=torch.float32)
    torch.testing.assert_close(ours(x), theirs(x))

    fresh = TwoConv(6, 10, 3, padding=1, bias=bias, activation="relu")
    fresh.load_state_dict(DepthwiseSeparableConv2d(6, 10, 3, padding=1, bias=bias).state_dict(), strict=True)
    ours.load_state_dict(fresh.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), fresh(x))


@pytest.mark.parametrize("bias", [(False, True), (True, False)], ids=str)
def test_bias_per_conv_loads_the_two_conv_checkpoint(bias):
    """MobileNet's usual block: a bias-free depthwise conv (a BatchNorm or the pointwise bias follows) and a pointwise
    conv with a bias. ``bias=(dw_bias, pw_bias)`` gives exactly that module's state_dict keys."""
    dw_bias, pw_bias = bias
    theirs = nn.Sequential(collections.OrderedDict([
        ("depthwise", nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=dw_bias)),
        ("act", nn.ReLU6()),
        ("pointwise", nn.Conv2d(6, 10, 1, bias=pw_bias)),
    ])).double()
    ours = DepthwiseSeparableConv2d(6, 10, 3, padding=1, bias=bias, activation="relu6", dtype=torch.float64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))

    fresh = DepthwiseSeparableConv2d(6, 10, 3, padding=1, bias=list(bias), activation="relu6", dtype=torch.float64)
    theirs.load_state_dict(fresh.state_dict(), strict=True)  # and back: ours saved, theirs loaded
    torch.testing.assert_close(theirs(x), fresh(x))


@pytest.mark.parametrize("bias", [None, 1, (True,), (True, False, True), (1, 0), "True"], ids=repr)
def test_bias_must_be_a_bool_or_a_pair_of_bools(bias):
    with pytest.raises(TypeError, match=r"bias must be a bool or a pair of bools \(dw_bias, pw_bias\), got"):
        DepthwiseSeparableConv2d(4, 6, 3, bias=bias)


def test_wrong_input_channels_blame_the_input():
    """As nn.Conv2d: 5 channels into a 4-channel module is the input's fault, not the weight's; the same message
    whether forward runs fused or (bn in training mode) one layer at a time."""
    fused = DepthwiseSeparableConv2d(4, 6, 3)
    (dw, bn, act, pw), _ = bn_layers({}, c=4, cout=6, dtype=torch.float32)
    unfused = DepthwiseSeparableConv2d.from_modules(dw, pw, act, bn)
    assert fused.fused and not unfused.fused
    for module in (fused, unfused):
        with pytest.raises(ValueError, match=r"DepthwiseSeparableConv2d\(in_channels=4\) expected input x "
                                             r"\[N, C, H, W\] to have 4 channels, but got 5 channels instead "
                                             r"\(shape \(2, 5, 8, 8\)\)"):
            module(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):  # other defects: the op's own checks
        fused(torch.randn(5, 8, 8))


def test_residual_is_added_after_pointwise():
    ours = DepthwiseSeparableConv2d(4, 4, 3, padding=1, activation="relu6", dtype=torch.float64)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    r = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(x, residual=r), ours(x) + r)


# --- from_modules and BatchNorm --------------------------------------------------------------------------

def bn_layers(bn_kwargs, c=6, cout=10, dtype=torch.float64):
    """(depthwise, bn, act, pointwise) with random affine parameters, and the Sequential reference."""
    dw = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c)
    bn = nn.BatchNorm2d(c, **bn_kwargs)
    if bn.affine:  # default gamma=1, beta=0 would hide a missing or misplaced scale/shift
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    layers = [m.to(dtype) for m in (dw, bn, nn.ReLU6(), nn.Conv2d(c, cout, 1))]
    return layers, nn.Sequential(*copy.deepcopy(layers))


BN_KINDS = [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}]


@pytest.mark.parametrize("bn_kwargs", BN_KINDS, ids=str)
def test_from_modules_with_bn_matches_reference_in_train_and_eval(bn_kwargs):
    (dw, bn, act, pw), reference = bn_layers(bn_kwargs)
    ours = DepthwiseSeparableConv2d.from_modules(dw, pw, act, bn)
    assert not ours.fused and "fused=False" in repr(ours)

    for _ in range(3):  # training: batch statistics, unfused; running stats must update identically
        x = torch.randn(4, 6, 9, 9, dtype=torch.float64)
        grad_out = torch.randn(4, 10, 5, 5, dtype=torch.float64)
        y, gx, grads = run(ours, x, grad_out)
        y_ref, gx_ref, grads_ref = run(reference, x, grad_out)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, gx_ref)
    assert_same_bn_state(ours.bn, reference[1])

    ours.eval()
    reference.eval()
    assert ours.fused == bn.track_running_stats
    assert ("fused=True" in repr(ours)) == ours.fused
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    grad_out = torch.randn(4, 10, 5, 5, dtype=torch.float64)
    y, gx, grads = run(ours, x, grad_out)
    y_ref, gx_ref, grads_ref = run(reference, x, grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    # Sequential names its layers 0..3, ours depthwise/bn/pointwise. Gradients reach gamma, beta via the fold.
    names = {"depthwise": "0", "bn": "1", "pointwise": "3"}
    for name, grad in grads.items():
        child, param = name.split(".")
        torch.testing.assert_close(grad, grads_ref[f"{names[child]}.{param}"])
    assert_same_bn_state(ours.bn, reference[1])


def assert_same_bn_state(bn, bn_ref):
    for key, value in bn_ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[key], value)


def test_from_modules_shares_parameters_and_keeps_modes():
    (dw, bn, act, pw), _ = bn_layers({})
    bn.eval()
    ours = DepthwiseSeparableConv2d.from_modules(dw, pw, act, bn)
    assert ours.depthwise.weight is dw.weight and ours.depthwise.bias is dw.bias
    assert ours.pointwise.weight is pw.weight and ours.bn is bn
    assert ours.training and not bn.training and ours.fused
    assert list(ours.state_dict()) == [
        "depthwise.weight", "depthwise.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
        "bn.num_batches_tracked", "pointwise.weight", "pointwise.bias"]


@pytest.mark.parametrize("padding, expected", [("valid", (0, 0)), ("same", (2, 1)), (1, (1, 1))])
def test_from_modules_string_padding(padding, expected):
    dw = nn.Conv2d(5, 5, (5, 3), padding=padding, groups=5).double()
    pw = nn.Conv2d(5, 3, 1, padding="same").double()
    ours = DepthwiseSeparableConv2d.from_modules(dw, pw, "silu")
    assert ours.depthwise.padding == expected
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64)
    torch.testing.assert_close(ours(x), pw(F.silu(dw(x))))


def test_bn_folded_in_float32_beside_half_convs():
    # BatchNorm kept in fp32 next to reduced-precision convs: the fold must come back in the conv dtype.
    dw = nn.Conv2d(4, 4, 3, padding=1, groups=4).to(torch.bfloat16)
    pw = nn.Conv2d(4, 8, 1).to(torch.bfloat16)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_var.uniform_(0.5, 2.0)
    ours = DepthwiseSeparableConv2d.from_modules(dw, pw, None, bn)
    x = torch.randn(2, 4, 6, 6)
    reference = copy.deepcopy(pw).float()(bn(copy.deepcopy(dw).float()(x)))  # copies: ours shares dw, pw
    torch.testing.assert_close(ours(x.bfloat16()).float(), reference, atol=0.1, rtol=0.05)


# --- torch.compile ----------------------------------------------------------------------------------------

def _plain_module():
    return DepthwiseSeparableConv2d(6, 10, 3, stride=2, padding=1, activation="hardswish")


def _bn_folding_module():
    (dw, bn, act, pw), _ = bn_layers({}, dtype=torch.float32)
    bn.running_mean.uniform_(-1, 1)
    return DepthwiseSeparableConv2d.from_modules(dw, pw, act, bn).eval()  # eval: the BN fold is traced too


# Inductor on the plain module: its graph is the custom op alone. The BN fold adds only stock torch ops,
# so aot_eager (dynamo + the fake function + AOT autograd, no C++ codegen) proves it traces in ~1/3 the time.
@pytest.mark.parametrize("make, backend", [(_plain_module, "inductor"), (_bn_folding_module, "aot_eager")])
def test_torch_compile_fullgraph_matches_eager(make, backend):
    ours = make()
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    x = torch.randn(2, 6, 9, 9).to(memory_format=torch.channels_last)
    r = torch.randn(2, 10, 5, 5)
    grad_out = torch.randn(2, 10, 5, 5)
    y, gx, grads = run(WithResidual(ours, r), x, grad_out)
    y_c, gx_c, grads_c = run(WithResidual(compiled, r), x, grad_out)
    torch.testing.assert_close(y_c, y)
    assert y_c.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gx_c, gx)
    for name in grads:  # torch.compile's wrapper adds `_orig_mod.` to the parameter names
        torch.testing.assert_close(grads_c[name.replace("inner.", "inner._orig_mod.")], grads[name])


class WithResidual(nn.Module):
    """``inner(x, residual)`` as a one-input module, so :func:`run` can drive it."""

    def __init__(self, inner, residual):
        super().__init__()
        self.inner = inner
        self.residual = residual

    def forward(self, x):
        return self.inner(x, self.residual)


# --- bad arguments ----------------------------------------------------------------------------------------

def _dw(c=4, **kw):
    return nn.Conv2d(c, c, 3, padding=1, groups=c, **kw)


def _pw(c=4, cout=6, **kw):
    return nn.Conv2d(c, cout, 1, **kw)


def _pruned_dw():
    conv = _dw()
    torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.5)
    return conv


def _hooked_pw():
    conv = _pw()
    conv.register_forward_hook(lambda *args: None)
    return conv


@pytest.mark.parametrize("make, match", [
    (lambda: (nn.Conv2d(4, 4, 3, padding=1), _pw(), None, None), "depthwise_conv must be depthwise"),
    (lambda: (nn.Linear(4, 4), _pw(), None, None), "depthwise_conv must be an nn.Conv2d"),
    (lambda: (_dw(padding_mode="reflect"), _pw(), None, None), "depthwise_conv must use padding_mode"),
    (lambda: (_pruned_dw(), _pw(), None, None), r"depthwise_conv\.weight is a computed"),
    (lambda: (_dw(), nn.Conv2d(4, 6, 3), None, None), r"pointwise_conv .*kernel_size=\(3, 3\)"),
    (lambda: (_dw(), _pw(c=5), None, None), "pointwise_conv .*in_channels=5 \\(need 4\\)"),
    (lambda: (_dw(), _pw(stride=2), None, None), "pointwise_conv .*stride"),
    (lambda: (_dw(), _pw().double(), None, None), "pointwise_conv must have the depthwise conv's dtype"),
    (lambda: (_dw(), _hooked_pw(), None, None), "pointwise_conv has forward/backward hooks"),
    (lambda: (_dw(), _pw(), nn.Tanh(), None), "activation"),
    (lambda: (_dw(), _pw(), "tanh", None), "activation"),
    (lambda: (_dw(), _pw(), nn.GELU(approximate="tanh"), None), "activation"),
    (lambda: (_dw(), _pw(), None, nn.BatchNorm2d(5)), "bn must have num_features == 4"),
    (lambda: (_dw(), _pw(), None, nn.BatchNorm1d(4)), "bn must be None or an nn.BatchNorm2d"),
])
def test_from_modules_rejects_what_it_cannot_fuse(make, match):
    with pytest.raises(ValueError, match=match):
        DepthwiseSeparableConv2d.from_modules(*make())


def test_from_modules_rejects_asymmetric_same_padding():
    with pytest.raises(ValueError, match="depthwise_conv.padding='same'"):
        DepthwiseSeparableConv2d.from_modules(nn.Conv2d(4, 4, 4, padding="same", groups=4), _pw())


@pytest.mark.parametrize("kwargs, match", [
    ({"padding": "same", "stride": 2}, "padding='same'"),
    ({"padding": "full"}, "padding must be"),
    ({"activation": "tanh"}, "activation"),
])
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthwiseSeparableConv2d(4, 6, 3, **kwargs)


def test_pruning_the_children_after_construction_is_followed():
    """torch.nn.utils.prune on the children: the fused forward reads their weights without calling them, so it must
    run their pruning hooks itself (weight = weight_orig * weight_mask, after every optimizer step)."""
    from effikern.prune import prune_model

    module = DepthwiseSeparableConv2d(8, 16, 3, padding=1, activation="relu").double()
    prune_model(module, 0.5)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    for _ in range(2):
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()
    dw, pw = module.depthwise, module.pointwise
    expected = F.conv2d(F.relu(F.conv2d(x, dw.weight_orig * dw.weight_mask, dw.bias, padding=1, groups=8)),
                        pw.weight_orig * pw.weight_mask, pw.bias)
    assert module.fused
    torch.testing.assert_close(module(x), expected)


def test_a_hooked_child_runs_unfused_so_its_hook_runs():
    module = DepthwiseSeparableConv2d(4, 6, 3, padding=1)
    calls = []
    module.pointwise.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    x = torch.randn(2, 4, 5, 5)
    y = module(x)
    assert not module.fused and "pointwise has hooks" in repr(module)
    assert calls == [y.shape]
    torch.testing.assert_close(y, module.pointwise(module.depthwise(x)))
