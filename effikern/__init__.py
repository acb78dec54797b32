"""effikern: fused Triton, CUDA and C++ kernels for PyTorch, as drop-in modules and functions.

No GPU, Triton or compiled extension is needed to import it: backends load on first use.
"""

from . import ops  # noqa: F401  (registers the torch.ops.effikern ops)
from . import amp, data, functional, losses, nn, optim
from .backends import BackendUnavailableError, get_backend, set_backend
from .optimize import optimize

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "amp", "data", "functional", "get_backend", "losses", "nn", "optim", "optimize",
    "set_backend",
    "__version__",
]
