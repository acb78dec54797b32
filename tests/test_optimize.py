"""effikern.optimize: replaces what it can prove, leaves the rest, and keeps the model's outputs.

Models run in float64, where folding BatchNorm and fusing change results by ~1e-15, so the default
``assert_close`` tolerances would catch any real difference.
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import effikern
from effikern.nn import DepthwiseSeparableConv2d
from effikern.optimize import RULES, Rewrite


def dw_bn_act_pw_bn(cin, cout, stride):
    """MobileNetV1's block as a Sequential: dw 3x3 -> BN -> ReLU6 -> pw -> BN -> ReLU6."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(True),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(True),
    )


class ResidualBlock(nn.Module):
    """depthwise/pointwise children, but forward adds the input: must be left alone."""

    def __init__(self, c):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.pointwise = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pointwise(self.act(self.bn(self.depthwise(x))))


class PlainBlock(nn.Module):
    """forward is exactly pw(act(dw(x))): must be replaced."""

    def __init__(self, cin, cout, activation=None):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 5, padding=2, groups=cin)
        self.act = activation or nn.SiLU()
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.act(self.depthwise(x)))


class FunctionalBlock(PlainBlock):
    """The activation as an F.* call with keyword arguments: ``forward`` is built per instance."""

    def __init__(self, cin, cout, function, **kwargs):
        super().__init__(cin, cout)
        del self.act
        self.function, self.kwargs = function, kwargs

    def forward(self, x):
        return self.pointwise(self.function(self.depthwise(x), **self.kwargs))


class BranchingBlock(PlainBlock):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        z = self.depthwise(x)
        return self.pointwise(z if z.sum() > 0 else -z)


class UntraceableBlock(PlainBlock):
    """No branch, but a call torch.fx cannot trace."""

    def forward(self, x):
        return self.pointwise(self.act(self.depthwise(x))) * len(x)


class TrainingBranchBlock(PlainBlock):
    """fx would record only the branch of the mode it traced in: fused, train mode would lose the dropout."""

    def forward(self, x):
        z = self.depthwise(x)
        if self.training:
            z = F.dropout(z, 0.5)
        return self.pointwise(z)


class HelperTrainingBranchBlock(PlainBlock):
    """The same branch inside a method forward calls: no jump in forward's own code."""

    def drop(self, z):
        return F.dropout(z, 0.5) if self.training else z

    def forward(self, x):
        return self.pointwise(self.drop(self.depthwise(x)))


class ClampingHardtanh(nn.Hardtanh):
    """A subclass with its own forward: its (0, 6) bounds prove nothing."""

    def forward(self, x):
        return x.clamp(0, 1)


class TanhGELU(nn.GELU):
    def forward(self, x):
        return torch.tanh(x)


def _with_own_hook(block):
    block.register_forward_hook(lambda module, args, out: out.clamp(min=0))
    return block


def mobilenet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
        dw_bn_act_pw_bn(8, 16, 1),
        ResidualBlock(16),
        dw_bn_act_pw_bn(16, 24, 2),
        PlainBlock(24, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).double()


def warmed_up(model):
    """The model after a few training batches, so BatchNorm's running statistics are not 0 and 1."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    return model


def test_mobilenet_outputs_unchanged_and_report():
    model = warmed_up(mobilenet()).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = model(x)

    optimized, report = effikern.optimize(model, inplace=False)

    torch.testing.assert_close(optimized(x), expected)
    assert {e.name for e in report.replaced} == {"3.0", "5.0", "6"}
    assert [e.name for e in report.left] == ["4"] and "residual add" in report.left[0].reason
    assert isinstance(optimized[3][0], DepthwiseSeparableConv2d) and optimized[3][0].fused
    assert list(optimized[3]._modules) == ["0", "4", "5"]  # the run took its first layer's name
    assert isinstance(optimized[4], ResidualBlock) and isinstance(optimized[6], DepthwiseSeparableConv2d)
    assert not any(isinstance(m, DepthwiseSeparableConv2d) for m in model.modules())  # inplace=False
    table = str(report)
    assert "3 replaced, 1 left" in table and "load checkpoints before optimize" in table
    assert all(e.name in table and e.reason in table for e in report.entries)


def test_training_mode_equivalent_and_running_stats_identical():
    model = warmed_up(mobilenet())
    optimized, _ = effikern.optimize(copy.deepcopy(model))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    grad_out = torch.randn(4, 10, dtype=torch.float64)
    model(x).backward(grad_out)
    optimized(x).backward(grad_out)
    # Same BatchNorms (one in the fused module's ``bn`` slot), same order: compare them pairwise.
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    fused_bns = [m for m in optimized.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, fused_bn in zip(bns, fused_bns, strict=True):
        torch.testing.assert_close(fused_bn.running_mean, bn.running_mean)
        torch.testing.assert_close(fused_bn.running_var, bn.running_var)
        torch.testing.assert_close(fused_bn.weight.grad, bn.weight.grad)
    model.eval()
    optimized.eval()
    torch.testing.assert_close(optimized(x), model(x))


def test_inplace_keeps_parameters_so_an_existing_optimizer_still_trains_them():
    model = warmed_up(mobilenet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimized, _ = effikern.optimize(model)
    assert optimized is model
    assert {id(p) for p in optimized.parameters()} == {id(p) for p in optimizer.param_groups[0]["params"]}


@pytest.mark.parametrize("block, replaced, reason", [
    (FunctionalBlock(4, 6, F.gelu), True, "gelu"),
    (FunctionalBlock(4, 6, F.relu, inplace=True), True, "relu"),
    (FunctionalBlock(4, 6, torch.relu), True, "relu"),
    (FunctionalBlock(4, 6, F.gelu, approximate="tanh"), False, "calls gelu with {'approximate': 'tanh'}"),
    (FunctionalBlock(4, 6, torch.tanh), False, "tanh"),
    (PlainBlock(4, 6, nn.Tanh()), False, "expected a 1x1 nn.Conv2d after depthwise, got Tanh"),
    (BranchingBlock(4, 6), False, "forward has Python control flow (line"),
    (UntraceableBlock(4, 6), False, "torch.fx cannot trace forward"),
    (TrainingBranchBlock(4, 6), False, "forward has Python control flow"),
    (HelperTrainingBranchBlock(4, 6), False, "forward traces differently in train and eval mode"),
    (PlainBlock(4, 6, ClampingHardtanh(0.0, 6.0)), False, "clamp (call_method clamp) is not a fusable step"),
    (PlainBlock(4, 6, TanhGELU()), False, "tanh (call_function tanh) is not a fusable step"),
    (_with_own_hook(PlainBlock(4, 6)), False, "the module has hooks"),
])
def test_blocks_replaced_only_when_forward_is_the_chain(block, replaced, reason):
    model = nn.Sequential(block.double(), nn.ReLU()).eval()  # eval: some blocks drop out in training
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    expected = model(x)
    optimized, report = effikern.optimize(model, inplace=False)
    assert [(e.name, e.action) for e in report.entries] == [("0", "replaced" if replaced else "left")]
    assert reason in report.entries[0].reason
    assert isinstance(optimized[0], DepthwiseSeparableConv2d) == replaced
    torch.testing.assert_close(optimized(x), expected)


def _hooked_bn(model):
    model[1].register_forward_hook(lambda *args: None)
    return model


def _tanh_instead_of_relu6(model):
    model[2] = nn.Tanh()
    return model


@pytest.mark.parametrize("edit, reason", [
    (_hooked_bn, "bn has forward/backward hooks, which the fused module would not run"),
    (_tanh_instead_of_relu6, "expected a 1x1 nn.Conv2d after depthwise -> bn, got Tanh"),
])
def test_sequential_run_left_with_reason(edit, reason):
    model = edit(dw_bn_act_pw_bn(4, 6, 1))
    _, report = effikern.optimize(model)
    assert [(e.name, e.action, e.reason) for e in report.entries] == [("0", "left", reason)]


@pytest.mark.parametrize("activation", [ClampingHardtanh(0.0, 6.0), TanhGELU()], ids=lambda m: type(m).__name__)
def test_activation_subclasses_are_not_fused(activation):
    """isinstance(module, nn.Hardtanh) once fused a subclass with its own forward as relu6."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), activation, nn.Conv2d(4, 6, 1)).eval()
    x = 4 * torch.randn(2, 4, 5, 5)
    expected = model(x)
    model, report = effikern.optimize(model)
    assert [e.action for e in report.entries] == ["left"]
    assert f"got {type(activation).__name__}" in report.entries[0].reason
    torch.testing.assert_close(model(x), expected)


def test_sequential_subclass_runs_are_not_matched():
    class Reversed(nn.Sequential):  # its own forward: consecutive children need not feed each other
        def forward(self, x):
            for module in reversed(self):
                x = module(x)
            return x

    model = Reversed(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    _, report = effikern.optimize(model)
    assert [(e.name, e.action) for e in report.entries] == [("0", "left")]
    assert "the data flow is not known" in report.entries[0].reason
    assert type(model[0]) is nn.Conv2d


class LoopedModuleList(nn.Module):
    """dw -> act -> pw held in an nn.ModuleList and run by a loop: the chain is real, but nothing proves it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(4, 6, 1)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class SameConv2d(nn.Conv2d):
    """A Conv2d subclass (timm's Conv2dSame, QAT convs): its forward may not be Conv2d's."""


@pytest.mark.parametrize("make, name, reason", [
    (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 6, 1)), "0",
     "depthwise conv with depth multiplier 2 (out_channels 8 = 2 x in_channels 4): the fused op takes multiplier 1"),
    (LoopedModuleList, "layers.0", "not followed by a 1x1 nn.Conv2d in an nn.Sequential (the last child of one, or "
                                   "outside one, where the data flow is not known)"),
    (lambda: nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 3, groups=6)), "1",
     "not followed by a 1x1 nn.Conv2d in an nn.Sequential"),
    (lambda: nn.Sequential(SameConv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1)), "0",
     "depthwise conv of type SameConv2d, a subclass of nn.Conv2d whose forward may differ"),
])
def test_every_depthwise_conv_left_alone_is_reported_with_why(make, name, reason):
    """The report lists what was left alone and why: depthwise convs that no rule can fuse used to be missing from
    it ("0 replaced, 0 left")."""
    model = make()
    x = torch.randn(2, 4, 7, 7)
    expected = model(x)
    optimized, report = effikern.optimize(model)
    assert [(e.name, e.action) for e in report.entries] == [(name, "left")]
    assert reason in report.entries[0].reason
    assert "0 replaced, 1 left" in str(report) and reason in str(report)
    assert not any(isinstance(m, DepthwiseSeparableConv2d) for m in optimized.modules())
    torch.testing.assert_close(optimized(x), expected)


def test_a_left_block_is_reported_once_not_again_for_its_depthwise_child(monkeypatch):
    """The block's own reason (a residual add) says why its depthwise child stays; the child's "data flow is not
    known" would only add noise. Other rules still report on its children: here the sparse rule, on a pruned
    pointwise conv, with no measurement to swap it by."""
    model = nn.Sequential(ResidualBlock(4))
    _, report = effikern.optimize(model)
    assert [(e.name, e.action) for e in report.entries] == [("0", "left")]
    assert "residual add" in report.entries[0].reason
    _, report = effikern.optimize(ResidualBlock(4))  # the same at the root
    assert [(e.name, e.action) for e in report.entries] == [("", "left")]

    monkeypatch.setattr(sys.modules["effikern.optimize"], "SPARSE_FASTER", {})  # the package's optimize is the function
    torch.nn.utils.prune.l1_unstructured(model[0].pointwise, "weight", amount=0.75)
    _, report = effikern.optimize(model)
    assert [(e.name, e.action) for e in report.entries] == [("0", "left"), ("0.pointwise", "left")]
    assert "no measurement shows the sparse kernel faster" in report.entries[1].reason


def test_root_module_is_replaced():
    block = PlainBlock(4, 6).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    optimized, report = effikern.optimize(block)
    assert isinstance(optimized, DepthwiseSeparableConv2d) and report.replaced[0].name == ""
    assert "(model)" in str(report)
    torch.testing.assert_close(optimized(x), block(x))


def test_custom_rule_plugs_in():
    def drop_dropout(window):  # a stand-in for another family's rule
        if type(window[0]) is nn.Dropout:
            return Rewrite(1, nn.Identity(), "dropout removed")
        return None

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Dropout(), nn.Conv2d(4, 4, 1))
    optimized, report = effikern.optimize(model, rules=[*RULES, drop_dropout])
    assert [(e.name, e.action) for e in report.entries] == [("0", "left"), ("1", "replaced")]
    assert isinstance(optimized[1], nn.Identity)


def test_optimizing_twice_leaves_fused_modules_alone():
    """A second optimize() must not look inside a DepthwiseSeparableConv2d: its pointwise child, pruned, was once
    swapped for a SparseConv2d1x1, which the fused forward cannot read (AttributeError on the next call)."""
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 128, 1)).eval()
    with torch.no_grad():
        model[1].weight.mul_((torch.rand_like(model[1].weight) > 0.9).float())
    x = torch.randn(1, 64, 8, 8)
    expected = model(x)
    model, _ = effikern.optimize(model)
    model, report = effikern.optimize(model)
    assert report.entries == [] and isinstance(model[0], DepthwiseSeparableConv2d)
    torch.testing.assert_close(model(x), expected)
