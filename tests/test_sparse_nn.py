"""SparseLinear / SparseConv2d1x1 from pruned layers, fine-tuning that keeps the pattern, state_dict, compile,
and optimize() swapping pruned layers."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from backend_util import skip_unavailable
from torch import nn
from torch.nn.utils import prune

import effikern
from effikern import _auto
from effikern.nn import SparseConv2d1x1, SparseLinear
from effikern.prune import prune_model

optimize_module = importlib.import_module("effikern.optimize")  # the module (effikern.optimize is the function)

CPU_BACKENDS = ["torch", "cpp"]


def _pruned_linear(pattern, n=48, k=64, amount=0.7):
    layer = nn.Linear(k, n)
    prune_model(layer, amount, pattern=pattern, block_size=(16, 16))
    return layer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pattern,fmt", [("unstructured", "auto"), ("block", "auto"), ("block", "unstructured"),
                                         ("2:4", "2:4"), ("2:4", "auto")])
def test_from_pruned_linear_same_output(backend, pattern, fmt):
    skip_unavailable(backend, "cpu")
    layer = _pruned_linear(pattern)
    sparse = SparseLinear.from_linear(layer, format=fmt)
    if pattern == "block" and fmt == "auto":
        assert sparse.format == "block" and sparse.block_size == (16, 16)
    x = torch.randn(2, 5, 64)
    with effikern.set_backend(backend):
        torch.testing.assert_close(sparse(x), layer(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse.to_linear().weight, layer.weight)


def test_from_linear_with_zeros():
    layer = nn.Linear(13, 7)
    with torch.no_grad():
        layer.weight[torch.rand(7, 13) < 0.6] = 0
    sparse = SparseLinear.from_linear(layer, format="unstructured")
    assert torch.equal(sparse.dense_weight(), layer.weight)
    x = torch.randn(1, 13)
    torch.testing.assert_close(sparse(x), layer(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pattern", ["unstructured", "block", "2:4"])
def test_finetuning_keeps_the_pattern(backend, pattern):
    """After optimizer steps the pruned weights are still exactly zero, and the kept ones moved."""
    skip_unavailable(backend, "cpu")
    layer = _pruned_linear(pattern)
    mask = layer.weight_mask.bool()
    sparse = SparseLinear.from_linear(layer, format="unstructured" if pattern == "2:4" else "auto")
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    before = sparse.dense_weight()
    with effikern.set_backend(backend):
        for _ in range(2):
            opt.zero_grad()
            sparse(torch.randn(4, 64)).square().mean().backward()
            opt.step()
    after = sparse.dense_weight()
    assert torch.all(after[~mask] == 0)
    assert torch.all((after != before)[mask])


def test_stored_but_pruned_positions_get_no_gradient():
    """Zeros inside a stored block are stored; their gradient must be exactly 0."""
    layer = nn.Linear(16, 8)
    mask = torch.ones(8, 16)
    mask[0, :3] = 0  # inside the first 4x4 block
    mask[:, 4:8] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    prune.custom_from_mask(layer, "weight", mask)
    sparse = SparseLinear.from_linear(layer, format="block", block_size=(4, 4))
    assert sparse.value_mask is not None
    sparse(torch.randn(3, 16)).sum().backward()
    assert torch.all(sparse.values.grad[~sparse.value_mask] == 0)


def test_state_dict_round_trip_across_patterns():
    a = SparseLinear.from_linear(_pruned_linear("block"), format="block", block_size=(16, 16))
    b = SparseLinear.from_linear(_pruned_linear("unstructured", amount=0.3))
    b.load_state_dict(a.state_dict())
    assert b.format == "block" and b.block_size == (16, 16)
    assert torch.equal(b.dense_weight(), a.dense_weight())
    x = torch.randn(3, 64)
    torch.testing.assert_close(b(x), a(x))


def test_memory_report_inference():
    sparse = SparseLinear.from_linear(_pruned_linear("block", n=256, k=256, amount=0.5)).for_inference()
    report = sparse.memory_report()
    assert report["total"] < report["dense"]
    with pytest.raises(RuntimeError, match="training arrays"):
        x = torch.randn(2, 256)
        sparse(x).sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_conv1x1(backend):
    skip_unavailable(backend, "cpu")
    conv = nn.Conv2d(32, 24, 1)
    prune_model(conv, 0.8)
    sparse = SparseConv2d1x1.from_conv(conv)
    x = torch.randn(2, 32, 5, 3)
    with effikern.set_backend(backend):
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
        xl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(sparse(xl), conv(xl), rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse.to_conv().weight, conv.weight)


def test_an_input_of_another_dtype_is_named_as_the_input():
    """A module's user passed x, not 'values': the error says the layer's weights and the input disagree, as
    nn.Linear's does; under autocast both are cast and it runs."""
    lin = SparseLinear.from_linear(_pruned_linear("unstructured"))
    conv = SparseConv2d1x1.from_conv(prune.l1_unstructured(nn.Conv2d(64, 48, 1), "weight", amount=0.7))
    for module, x in ((lin, torch.randn(3, 64, dtype=torch.bfloat16)),
                      (conv, torch.randn(1, 64, 2, 2, dtype=torch.bfloat16))):
        with pytest.raises(TypeError, match=f"{type(module).__name__} holds float32 weights and got a bfloat16 "
                                            "input"):
            module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module(x).dtype == torch.bfloat16


def test_conv_errors():
    with pytest.raises(ValueError, match=r"kernel_size is \(3, 3\)"):
        SparseConv2d1x1.from_conv(nn.Conv2d(4, 4, 3))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(4, 4, 1))


def test_compile_fullgraph():
    sparse = SparseLinear.from_linear(_pruned_linear("unstructured"))
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(sparse, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, sparse(x))
    y.sum().backward()
    assert x.grad is not None and sparse.values.grad is not None


# --- optimize() ------------------------------------------------------------------------------------------

class Block(nn.Module):
    """A small pre-norm transformer block (attention + MLP) built from nn.Linear layers."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


@pytest.fixture
def sparse_table(monkeypatch):
    """A table that says sparse is faster for fp32 CPU at >= 50%: optimize()'s swap is what is tested here."""
    table = {(_auto.table_device("cpu"), torch.float32, f): ((64, 0.5),) for f in ("unstructured", "block16", "2:4")}
    monkeypatch.setattr(optimize_module, "SPARSE_FASTER", table)


@pytest.mark.usefixtures("sparse_table")
@pytest.mark.parametrize("pattern", ["unstructured", "block", "2:4"])
def test_optimize_pruned_models_same_outputs(pattern):
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.Conv2d(32, 32, 1))
    block = Block()
    for model, x in ((mlp[:3], torch.randn(5, 64)), (block, torch.randn(2, 7, 64))):
        prune_model(model, 0.75, pattern=pattern, block_size=(16, 16))
        with torch.no_grad():  # a pruned module cannot be deep-copied after a forward that built a graph
            expected = model(x)
        optimized, report = effikern.optimize(model, inplace=False)
        assert len(report.replaced) == sum(isinstance(m, nn.Linear) for m in model.modules()), str(report)
        assert not any(type(m) is nn.Linear for m in optimized.modules())
        torch.testing.assert_close(optimized(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("sparse_table")
def test_optimize_pruned_conv1x1_and_dense_layers_left():
    model = nn.Sequential(nn.Conv2d(8, 32, 3), nn.Conv2d(32, 16, 1), nn.Linear(4, 4))
    prune.l1_unstructured(model[1], "weight", amount=0.8)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        expected = model[:2](x)
    optimized, report = effikern.optimize(model, inplace=False)
    assert isinstance(optimized[1], SparseConv2d1x1) and type(optimized[2]) is nn.Linear
    torch.testing.assert_close(optimized[:2](x), expected, rtol=1e-5, atol=1e-5)
    assert [e.name for e in report.replaced] == ["1"]


def test_optimize_reports_why_not(monkeypatch):
    monkeypatch.setattr(optimize_module, "SPARSE_FASTER",
                        {(_auto.table_device("cpu"), torch.float32, "unstructured"): ((64, 0.9),)})
    model = nn.Sequential(nn.Linear(64, 64))
    prune_model(model, 0.6)
    _, report = effikern.optimize(model, inplace=False)
    assert not report.replaced
    assert "measured faster than dense only at >= 90% sparsity" in report.left[0].reason
    monkeypatch.setattr(optimize_module, "SPARSE_FASTER", {})
    _, report = effikern.optimize(model, inplace=False)
    assert "no measurement shows the sparse kernel faster" in report.left[0].reason


def test_from_linear_shares_the_bias_and_keeps_frozen_weights_frozen():
    """optimize() promises that an optimizer built before it keeps training the model: the bias is the dense layer's
    own Parameter, and a frozen weight gives frozen values (they were a fresh, trainable clone)."""
    dense = nn.Linear(64, 32)
    prune_model(dense, 0.9)
    dense.weight_orig.requires_grad_(False)
    optimizer = torch.optim.SGD([dense.bias], lr=1.0)
    model, _ = effikern.optimize(nn.Sequential(dense))
    sparse = model[0]
    assert isinstance(sparse, SparseLinear) and sparse.bias is dense.bias and not sparse.values.requires_grad
    before = sparse.bias.detach().clone()
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(sparse.bias.detach(), before)


def test_loading_another_pattern_keeps_the_module_dtype():
    a, b = nn.Linear(40, 24), nn.Linear(40, 24)
    with torch.no_grad():
        a.weight[torch.rand(24, 40) < 0.7] = 0
        b.weight[torch.rand(24, 40) < 0.5] = 0
    checkpoint = SparseLinear.from_linear(a).bfloat16().state_dict()
    module = SparseLinear.from_linear(b)
    module.load_state_dict(checkpoint)
    assert module.values.dtype == module.bias.dtype == torch.float32
    torch.testing.assert_close(module(torch.randn(2, 40)).shape, (2, 24))
    torch.testing.assert_close(module.values, checkpoint["values"].float())


def test_sparse_rule_reads_the_thresholds_of_this_cpu_class(monkeypatch):
    """SPARSE_FASTER is keyed by CPU class as auto's table is: an AVX2 CPU reads the "cpu-avx2" entries, not the
    AVX-512 ones (it used the AVX-512 ones before those were measured)."""
    monkeypatch.setattr(optimize_module, "SPARSE_FASTER", {
        ("cpu", torch.float32, "unstructured"): ((16, 0.5),),
        ("cpu-avx2", torch.float32, "unstructured"): ((16, 0.99),)})
    model = nn.Sequential(nn.Linear(64, 64))
    prune_model(model, 0.75)
    for cpu_class, swapped in (("avx512", True), ("avx2", False), ("default", False)):
        monkeypatch.setattr(_auto, "cpu_class", lambda cpu_class=cpu_class: cpu_class)
        _, report = effikern.optimize(model, inplace=False)
        assert bool(report.replaced) == swapped, (cpu_class, str(report))
