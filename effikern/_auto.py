"""What ``auto`` picks, per op and device type: the backends in order of measured speed.

Only a measurement moves a backend ahead of ``torch`` here. Each entry names the results file it comes
from; a kernel that has not been timed on a device stays behind PyTorch on that device.
"""

_PREFERENCE = {
    # No GPU measurement exists yet (the Triton and CUDA kernels are interpreter-/compile-checked only):
    # on CUDA, auto keeps PyTorch (cuDNN) until benchmarks/results/ shows a kernel that beats it.
    ("dwsep_conv2d", "cuda"): ("torch",),
    ("dwsep_conv2d", "cpu"): ("torch",),
}


def preference(op: str, device_type: str):
    """Backends to try in order for ``op`` on ``device_type``; ``torch`` is always the last resort."""
    return _PREFERENCE.get((op, device_type), ("torch",))
