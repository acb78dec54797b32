"""When an op may skip the dispatcher: eager calls that no tracer, dispatch mode or autograd needs to see.

Why: a ``torch.library.custom_op`` that mutates tensor lists pays the dispatcher's Python bookkeeping (a version
counter bump per tensor, autograd and ADInplaceOrView layers) on every call: 0.9 ms per ``unscale_check_norm``
over 1000 gradients on CPU, more than its 0.6 ms kernel. The callers that run every step (GradScaler,
effikern.optim) call the implementation directly when :func:`must_dispatch` says nothing would be lost, and go
through the op otherwise. (For ``sparse_linear``, a non-mutating op, the same bypass saved only ~3 of its ~25 us
per call on CPU, most of it being argument checks and backend resolution; it is not used there.)
"""

from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})


def must_dispatch(tensors: Iterable[Optional[torch.Tensor]], autograd: bool = True) -> bool:
    """Whether a call on ``tensors`` (None entries ignored) must go through the registered op: under
    torch.compile / export, inside a dispatch mode (FakeTensor, functionalization), with a tensor subclass, or, when
    ``autograd`` is True, when grad mode is on and an input requires grad."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    present = [t for t in tensors if t is not None]
    if not {type(t) for t in present} <= _PLAIN_TENSORS:
        return True
    return autograd and torch.is_grad_enabled() and any(t.requires_grad for t in present)
