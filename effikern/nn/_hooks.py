"""The module hooks a replacement or a fused forward would bypass, and torch.nn.utils.prune's, which effikern runs
itself: one place for what optimize(), from_modules and DepthwiseSeparableConv2d check."""

from typing import List

from torch import nn
from torch.nn.utils.prune import BasePruningMethod


def hooks(module: nn.Module, skip_pruning: bool = False) -> List[object]:
    """Every forward-pre, forward, backward and backward-pre hook of ``module``; with ``skip_pruning``, not
    torch.nn.utils.prune's (forward-pre hooks that recompute a pruned weight)."""
    pre = [h for h in module._forward_pre_hooks.values() if not (skip_pruning and isinstance(h, BasePruningMethod))]
    return pre + [*module._forward_hooks.values(), *module._backward_hooks.values(),
                  *module._backward_pre_hooks.values()]


def run_pruning_hooks(module: nn.Module) -> None:
    """Runs ``module``'s torch.nn.utils.prune hooks (weight = weight_orig * weight_mask), as calling it would; they
    take no input."""
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, BasePruningMethod):
            hook(module, ())
