"""torch.library ops in the ``effikern`` namespace; importing this registers them all."""

from . import dwsep  # noqa: F401  (registers torch.ops.effikern.dwsep_conv2d*)
from . import distill  # noqa: F401  (registers torch.ops.effikern.distillation_loss*)
