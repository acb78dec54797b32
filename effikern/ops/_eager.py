"""When an op may skip the dispatcher: eager calls that no tracer, dispatch mode or autograd needs to see.

Why: a ``torch.library.custom_op`` that mutates tensor lists pays the dispatcher's Python bookkeeping (a version
counter bump per tensor, autograd and ADInplaceOrView layers) on every call: 0.9 ms per ``unscale_check_norm``
over 1000 gradients on CPU, more than its 0.6 ms kernel. The callers that run every step (GradScaler,
effikern.optim) call the implementation directly when :func:`must_dispatch` says nothing would be lost, and go
through the op otherwise. ``sparse_linear`` and ``dwsep_conv2d`` do the same for a different cost: without
autograd their bypass saves only a few us per call, but the custom op's Python autograd layer costs ~70 us per
forward and as much per gradient op, so eager calls go through an autograd.Function over the same implementation
(``ops.sparse.EagerSparseLinear``, ``ops.dwsep.EagerDwsepConv2d``).
"""

from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})


def tracing() -> bool:
    """Whether the call is being traced or intercepted (torch.compile / export, or a dispatch mode such as
    FakeTensor or functionalization): such callers must see the registered op, not what it would run."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def must_dispatch(tensors: Iterable[Optional[torch.Tensor]], autograd: bool = True) -> bool:
    """Whether a call on ``tensors`` (None entries ignored) must go through the registered op: under
    torch.compile / export, inside a dispatch mode (FakeTensor, functionalization) or a functorch transform (vmap,
    grad), with a tensor subclass, or, when ``autograd`` is True, when grad mode is on and an input requires
    grad."""
    if tracing() or torch._C._are_functorch_transforms_active():
        return True
    present = [t for t in tensors if t is not None]
    if not {type(t) for t in present} <= _PLAIN_TENSORS:
        return True
    return autograd and torch.is_grad_enabled() and any(t.requires_grad for t in present)


def op_without_dispatcher(name: str, forward_impl, setup_context, gradients):
    """An autograd.Function called ``name`` that runs an op's own implementation (``forward_impl(*inputs)``) and its
    autograd formula (the ``setup_context(ctx, inputs, output)`` and ``gradients(ctx, *grads)`` the registered op
    uses) without the dispatcher, for eager calls where :func:`must_dispatch` (autograd=False) is False. Built with
    ``type`` so that the graph node is named after it (``<name>Backward``).

    A backward taken with ``create_graph=True`` runs ``gradients`` with grad mode on, as the registered op's does, so
    the op's formula decides (a differentiable path, or an error): gradients computed by a kernel carry no graph, and
    returning them would silently drop the second-order terms."""

    def forward(ctx, *inputs):
        output = forward_impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward(ctx, *grads):  # in grad mode exactly when create_graph=True (the engine sets it)
        return gradients(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
        "__module__": forward_impl.__module__,
    })
