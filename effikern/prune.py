"""Magnitude pruning on top of ``torch.nn.utils.prune``: the masks are ordinary prune masks.

Every pruned layer gets ``weight_orig`` and ``weight_mask`` (and ``weight`` recomputed as their product before each
forward), exactly as ``torch.nn.utils.prune`` does, so ``prune.remove``, checkpoints and any PyTorch tool keep
working, and :meth:`effikern.nn.SparseLinear.from_linear` / :func:`effikern.optimize` read them.

Patterns:
- "unstructured": the smallest |w| (``torch.nn.utils.prune.l1_unstructured``, or ``global_unstructured``);
- "block": :class:`BlockMagnitude`, whole (BR, BC) blocks of the weight viewed as [out, in * kh * kw], ranked by
  their mean |w|;
- "2:4" (any "N:M"): :class:`NMMagnitude`, the N largest |w| of every M consecutive inputs.
"""

import math
from typing import Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

from .sparse.formats import block_size_pair

PATTERNS = ("unstructured", "block", "2:4")


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """[out, in, ...] -> [out, in * ...] (a conv's weight as the matrix of its matmul)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def _count(amount, total: int) -> int:
    """prune's convention: a float in [0, 1] is a fraction of ``total``, an int a count."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise TypeError(f"amount must be a float in [0, 1] or an int, got {amount!r}")
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0:
            raise ValueError(f"amount must be in [0, 1] as a fraction, got {amount}")
        return round(amount * total)
    if not 0 <= amount <= total:
        raise ValueError(f"amount must be in [0, {total}] as a count, got {amount}")
    return amount


def _block_scores(t: torch.Tensor, block_size: Tuple[int, int]) -> torch.Tensor:
    """Mean |w| of every block of the [out, in...] weight -> [nb, kb] (edge blocks: over their in-range part)."""
    w = _as_matrix(t).abs().float()
    br, bc = block_size
    n, k = w.shape
    nb, kb = math.ceil(n / br), math.ceil(k / bc)
    padded, inside = w.new_zeros(nb * br, kb * bc), w.new_zeros(nb * br, kb * bc)
    padded[:n, :k], inside[:n, :k] = w, 1.0
    total = padded.reshape(nb, br, kb, bc).sum((1, 3))
    return total / inside.reshape(nb, br, kb, bc).sum((1, 3))


def _expand_blocks(keep: torch.Tensor, block_size, shape) -> torch.Tensor:
    """[nb, kb] block mask -> mask of the weight's shape."""
    br, bc = block_size
    n = shape[0]
    k = int(math.prod(shape[1:])) if len(shape) > 1 else shape[0]
    full = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:n, :k]
    return full.reshape(shape)


class BlockMagnitude(prune.BasePruningMethod):
    """Prunes the ``amount`` (fraction or count) of (BR, BC) blocks with the smallest mean |w|."""

    # "global": torch.nn.utils.prune hands compute_mask the whole tensor and the previous mask, even when this is
    # applied on top of another pruning. ("unstructured" hands it only the entries still kept, flattened, from which
    # no block structure can be rebuilt: a second block pruning raised, a 2:4 one gave a mask that was not 2:4.)
    PRUNING_TYPE = "global"

    def __init__(self, amount, block_size=(32, 32)):
        self.amount = amount
        self.block_size = block_size_pair(block_size)

    def compute_mask(self, t, default_mask):
        """Drops ``amount`` of the blocks that ``default_mask`` still keeps (any entry), as torch's iterative pruning
        takes its amount from what is left."""
        scores = _block_scores(t * default_mask, self.block_size)
        alive = _block_scores(default_mask, self.block_size) > 0
        drop = _count(self.amount, int(alive.sum()))
        keep = alive.clone()
        if drop:
            candidates = torch.where(alive, scores, torch.full_like(scores, math.inf))
            keep.view(-1)[torch.topk(candidates.view(-1), drop, largest=False).indices] = False
        return default_mask * _expand_blocks(keep, self.block_size, t.shape).to(default_mask.dtype)

    @classmethod
    def apply(cls, module, name, amount, block_size=(32, 32), importance_scores=None):
        return super().apply(module, name, amount=amount, block_size=block_size, importance_scores=importance_scores)


class NMMagnitude(prune.BasePruningMethod):
    """Keeps the ``n`` largest |w| in every group of ``m`` consecutive inputs (2:4 by default)."""

    PRUNING_TYPE = "global"  # the whole tensor, as BlockMagnitude

    def __init__(self, n=2, m=4):
        if not (isinstance(n, int) and isinstance(m, int) and 0 <= n <= m and m >= 1):
            raise ValueError(f"N:M pruning needs ints 0 <= n <= m, m >= 1; got n={n!r}, m={m!r}")
        self.n, self.m = n, m

    def compute_mask(self, t, default_mask):
        w = _as_matrix(t * default_mask).abs()
        if w.shape[1] % self.m:
            raise ValueError(f"{self.n}:{self.m} pruning needs the input size ({w.shape[1]}) divisible by {self.m}")
        groups = w.reshape(w.shape[0], -1, self.m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(groups, self.n, dim=-1).indices, True)
        return default_mask * keep.reshape(t.shape).to(default_mask.dtype)

    @classmethod
    def apply(cls, module, name, n=2, m=4, importance_scores=None):
        return super().apply(module, name, n=n, m=m, importance_scores=importance_scores)


def prune_model(model: nn.Module, amount, pattern: str = "unstructured", block_size=(32, 32),
                layers: Sequence[type] = (nn.Linear, nn.Conv2d), scope: str = "layer"):
    """Magnitude-prunes the weight of every module of a type in ``layers``; returns the list of pruned modules.

    Args:
        amount: fraction of weights (unstructured) or blocks (block) to prune, or an int count; ignored for "2:4"
            (which always keeps half).
        pattern: "unstructured", "block" (``block_size`` = (rows, cols) of the [out, in*kh*kw] weight) or "2:4".
        scope: "layer" prunes ``amount`` of each layer; "global" ranks the weights (or blocks) of all layers
            together, so layers with many small weights lose more.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layers = tuple(layers)
    modules = [m for m in model.modules() if isinstance(m, layers) and isinstance(getattr(m, "weight", None),
                                                                                    torch.Tensor)]
    if pattern == "2:4":
        for m in modules:
            NMMagnitude.apply(m, "weight", n=2, m=4)
        return modules
    if scope == "layer":
        for m in modules:
            if pattern == "unstructured":
                prune.l1_unstructured(m, "weight", amount=amount)
            else:
                BlockMagnitude.apply(m, "weight", amount=amount, block_size=block_size_pair(block_size))
        return modules
    if pattern == "unstructured":
        prune.global_unstructured([(m, "weight") for m in modules], prune.L1Unstructured, amount=amount)
        return modules
    _global_blocks(modules, amount, block_size_pair(block_size))
    return modules


def _global_blocks(modules, amount, block_size):
    """One threshold on the block scores of all layers; each layer's mask applied with prune.custom_from_mask."""
    scores = [_block_scores(m.weight.detach(), block_size) for m in modules]
    flat = torch.cat([s.reshape(-1).cpu() for s in scores]) if scores else torch.zeros(0)
    drop = _count(amount, flat.numel())
    keep_flat = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        keep_flat[torch.topk(flat, drop, largest=False).indices] = False
    start = 0
    for m, s in zip(modules, scores):
        keep = keep_flat[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
        prune.custom_from_mask(m, "weight", _expand_blocks(keep, block_size, m.weight.shape).to(m.weight.dtype))
