"""effikern.prune: magnitude pruning whose masks are ordinary torch.nn.utils.prune masks."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from effikern.prune import BlockMagnitude, NMMagnitude, prune_model
from effikern.sparse import is_2of4, is_block


def _model():
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32), nn.Conv2d(32, 16, 1), nn.Conv2d(16, 8, 3))


def _kept(module):
    return module.weight_mask.reshape(module.weight_mask.shape[0], -1).bool()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured(scope):
    model = _model()
    pruned = prune_model(model, 0.6, scope=scope)
    assert len(pruned) == 4
    for m in pruned:
        assert hasattr(m, "weight_orig") and hasattr(m, "weight_mask")
        assert torch.equal(m.weight, m.weight_orig * m.weight_mask)
    total = sum(m.weight_mask.numel() for m in pruned)
    zeros = sum(int((m.weight_mask == 0).sum()) for m in pruned)
    assert zeros == round(0.6 * total) if scope == "global" else abs(zeros / total - 0.6) < 0.01
    if scope == "layer":
        for m in pruned:
            assert int((m.weight_mask == 0).sum()) == round(0.6 * m.weight_mask.numel())


def test_unstructured_keeps_the_largest():
    layer = nn.Linear(8, 4)
    prune_model(layer, 0.5)
    kept = layer.weight_orig.abs()[layer.weight_mask.bool()]
    dropped = layer.weight_orig.abs()[~layer.weight_mask.bool()]
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_block(scope):
    model = _model()
    prune_model(model, 0.5, pattern="block", block_size=(16, 16), scope=scope, layers=(nn.Linear,))
    for m in (model[0], model[2]):
        assert is_block(_kept(m), (16, 16))
    if scope == "layer":
        assert abs(1 - model[0].weight_mask.mean().item() - 0.5) < 0.05


def test_block_keeps_the_strongest_blocks():
    layer = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.01)
        layer.weight[4:, :4] = 5.0
    BlockMagnitude.apply(layer, "weight", amount=3, block_size=(4, 4))
    assert layer.weight_mask.sum() == 16 and torch.all(layer.weight_mask[4:, :4] == 1)


def test_two_of_four():
    model = _model()
    prune_model(model, None, pattern="2:4", layers=(nn.Linear, nn.Conv2d))
    for m in (model[0], model[2], model[3]):
        mask = _kept(m)
        assert is_2of4(mask) and mask.sum() == mask.numel() // 2
    groups = model[0].weight_orig.abs().reshape(96, 16, 4)
    kept = model[0].weight_mask.reshape(96, 16, 4).bool()
    assert torch.all(groups[kept].reshape(96, 16, 2).min(-1).values >= groups[~kept].reshape(96, 16, 2).max(-1).values)


def test_masks_are_plain_prune_masks():
    layer = nn.Linear(16, 8)
    NMMagnitude.apply(layer, "weight")
    prune.remove(layer, "weight")  # any PyTorch tool that understands prune works
    assert not hasattr(layer, "weight_mask")
    assert is_2of4(layer.weight != 0)


def test_pruning_again_combines_masks():
    layer = nn.Linear(32, 32)
    prune_model(layer, 0.5, pattern="block", block_size=(8, 8))
    first = layer.weight_mask.clone()
    prune_model(layer, 0.5)
    assert torch.all(layer.weight_mask <= first)


class TestErrors:
    def test_pattern(self):
        with pytest.raises(ValueError, match="pattern must be one of"):
            prune_model(nn.Linear(4, 4), 0.5, pattern="3:4")

    def test_scope(self):
        with pytest.raises(ValueError, match="scope must be"):
            prune_model(nn.Linear(4, 4), 0.5, scope="model")

    def test_amount(self):
        with pytest.raises(ValueError, match="amount must be in"):
            prune_model(nn.Linear(4, 4), 1.5, pattern="block", block_size=2)

    def test_two_of_four_width(self):
        with pytest.raises(ValueError, match="divisible by 4"):
            prune_model(nn.Linear(6, 4), None, pattern="2:4")

    def test_block_size(self):
        with pytest.raises(ValueError, match="block_size must be"):
            prune_model(nn.Linear(4, 4), 0.5, pattern="block", block_size=(0, 2))


def test_structured_pruning_on_top_of_another_keeps_its_structure():
    """BlockMagnitude and NMMagnitude see the whole tensor and the previous mask when applied again (torch hands an
    "unstructured" method only the kept entries, flattened): block on block raised, 2:4 on unstructured gave a mask
    that was not 2:4, 2:4 twice pruned 75%."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    prune_model(layer, 0.5, "unstructured")
    prune_model(layer, 0.0, "2:4")
    assert is_2of4(layer.weight_mask.bool())
    layer = nn.Linear(64, 64)
    prune_model(layer, 0.0, "2:4")
    prune_model(layer, 0.0, "2:4")
    assert float(layer.weight_mask.mean()) == 0.5
    layer = nn.Linear(64, 64)
    prune_model(layer, 0.5, "block", block_size=16)
    prune_model(layer, 0.5, "block", block_size=16)  # half of the blocks left, as torch's iterative amounts
    assert is_block(layer.weight_mask.bool(), (16, 16)) and float(layer.weight_mask.mean()) == 0.25
