"""``DistillationLoss``: the knowledge-distillation loss as an ``nn.Module``."""

from typing import Optional

import torch
from torch import nn

from .. import functional
from ..ops.distill import check_options


class DistillationLoss(nn.Module):
    """``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target)``.

    See :func:`effikern.functional.distillation_loss` for the details; in short: CE uses the untempered
    student logits, tokens whose target is ``ignore_index`` count in neither term, ``target=None`` gives
    ``T^2 * KL`` alone (``alpha`` ignored), and only the student gets a gradient.

    Args:
        temperature: T > 0, default 1.0. alpha: in [0, 1], default 0.5. ignore_index: int, default -100.
        reduction: "mean" (default), "sum" or "none".
        inplace_backward: scale the saved student gradient in place in backward (one [..., V] buffer less at
            the peak; the graph can then be backpropagated only once). Default False.

    Shapes (forward):
        student_logits, teacher_logits: [..., V]; target: [...] int64 or None.
        Returns a float32 scalar, or [...] for reduction="none".
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100,
                 reduction: str = "mean", inplace_backward: bool = False):
        super().__init__()
        check_options(temperature, alpha, ignore_index, reduction, inplace_backward)
        self.temperature = temperature
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_backward = inplace_backward

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional.distillation_loss(student_logits, teacher_logits, target, self.temperature,
                                            self.alpha, self.ignore_index, self.reduction,
                                            self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}"
                + (", inplace_backward=True" if self.inplace_backward else ""))
