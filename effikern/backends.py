"""Backend selection: which implementation of an op runs.

Every op has up to four implementations:

- ``torch``: the pure-PyTorch reference (readable, obviously right, runs anywhere);
- ``cpp``: C++ CPU kernels in ``effikern._C``;
- ``triton``: Triton kernels (``effikern.kernels``), on CUDA, or on CPU tensors with ``TRITON_INTERPRET=1``;
- ``cuda``: CUDA C++ kernels in ``effikern._C``.

``set_backend(name)`` picks one for every op (also usable as a context manager); the environment variable
``EFFIKERN_BACKEND`` sets the initial choice. The default, ``auto``, takes per op and device the fastest
backend measured in ``benchmarks/results/`` (the table in ``effikern/_auto.py``), falling back to ``torch``
when that one cannot run the call (a dtype it lacks, say). An explicitly chosen backend that cannot run a
call raises :class:`BackendUnavailableError` instead of silently running something else.
"""

import dataclasses
import importlib.util
import os
import threading
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch

from . import _auto, _ext

BACKENDS = ("torch", "cpp", "triton", "cuda")
CHOICES = ("auto",) + BACKENDS


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call (not built, wrong device, unsupported dtype)."""


@dataclasses.dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``load`` is called once, on first use, and returns the callable; it is where the extension or Triton
    gets imported, so that importing effikern stays free of both.
    """

    backend: str
    devices: FrozenSet[str]
    dtypes: FrozenSet[torch.dtype]
    load: Callable[[], Callable]


_REGISTRY: Dict[str, Dict[str, Impl]] = {}
_LOADED: Dict[Tuple[str, str], Callable] = {}
_state = threading.local()


def _validate_choice(name: str, what: str = "backend") -> str:
    if name not in CHOICES:
        raise ValueError(f"{what} must be one of {CHOICES}, got {name!r}")
    return name


_DEFAULT = _validate_choice(os.environ.get("EFFIKERN_BACKEND", "auto").strip().lower() or "auto",
                            "the environment variable EFFIKERN_BACKEND")


def get_backend() -> str:
    """The current backend choice: 'auto' or one of BACKENDS."""
    return getattr(_state, "name", _DEFAULT)


class set_backend:  # noqa: N801 - used like a function, and as a context manager
    """Choose the backend for all effikern ops.

    ``effikern.set_backend("cpp")`` sets it until changed; ``with effikern.set_backend("triton"): ...``
    sets it for the block and restores the previous choice afterwards. The choice is per thread.
    """

    def __init__(self, name: str):
        self._previous = get_backend()
        _state.name = _validate_choice(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state.name = self._previous
        return False


def register(op: str, backend: str, devices, dtypes, load: Callable[[], Callable]) -> None:
    """Declare that ``backend`` implements ``op`` for these device types and dtypes."""
    assert backend in BACKENDS, backend
    _REGISTRY.setdefault(op, {})[backend] = Impl(backend, frozenset(devices), frozenset(dtypes), load)


def registered(op: str) -> Dict[str, Impl]:
    """backend name -> Impl for ``op``."""
    return dict(_REGISTRY.get(op, {}))


def ops():
    """Names of all registered ops."""
    return sorted(_REGISTRY)


def unavailable_reason(backend: str, device_type: str) -> Optional[str]:
    """None if ``backend`` can run on ``device_type`` in this process, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return f"the cpp backend runs on CPU tensors only, got {device_type}"
        return _ext.extension_error() and f"{_ext.extension_error()}: {_ext.BUILD_HINT}"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, got {device_type}"
        ext = _ext.extension()
        if ext is None:
            return f"{_ext.extension_error()}: {_ext.BUILD_HINT}"
        if not ext.build_info()["cuda"]:
            return f"effikern._C was built without CUDA kernels: {_ext.BUILD_HINT}"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the triton backend runs on CPU tensors only with TRITON_INTERPRET=1 set before triton is imported"
        if device_type not in ("cpu", "cuda"):
            return f"the triton backend runs on CUDA tensors, got {device_type}"
        return None
    raise ValueError(f"unknown backend {backend!r}")


def _why_not(op: str, impl: Optional[Impl], backend: str, device_type: str, dtype) -> Optional[str]:
    if impl is None:
        return f"{op} has no {backend} implementation"
    if device_type not in impl.devices:
        return f"the {backend} backend of {op} runs on {sorted(impl.devices)}, got a {device_type} tensor"
    if dtype not in impl.dtypes:
        names = sorted(str(d).replace("torch.", "") for d in impl.dtypes)
        return f"the {backend} backend of {op} supports dtypes {names}, got {str(dtype).replace('torch.', '')}"
    return unavailable_reason(backend, device_type)


def choose(op: str, device_type: str, dtype: torch.dtype, case: Optional[str] = None,
           choice: Optional[str] = None) -> str:
    """The backend that will run ``op`` on this device type and dtype under ``choice`` (None or "": the current
    choice, :func:`get_backend`); ``case`` is the class of shapes the op names for ``auto`` (see
    effikern/_auto.py)."""
    impls = _REGISTRY[op]
    choice = _validate_choice(choice) if choice else get_backend()
    if choice != "auto":
        reason = _why_not(op, impls.get(choice), choice, device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"effikern backend {choice!r} cannot run this call: {reason}")
        return choice
    for name in _auto.preference(op, device_type, dtype, case):
        if _why_not(op, impls.get(name), name, device_type, dtype) is None:
            return name
    return "torch"


def implementation(op: str, backend: str) -> Callable:
    """The loaded callable of ``backend`` for ``op`` (imports the extension / Triton on first use)."""
    key = (op, backend)
    if key not in _LOADED:
        _LOADED[key] = _REGISTRY[op][backend].load()
    return _LOADED[key]


def resolve(op: str, x: torch.Tensor, case: Optional[str] = None, choice: Optional[str] = None
            ) -> Tuple[str, Callable]:
    """(backend name, callable) for running ``op`` on tensors like ``x`` (``case``, ``choice``: as for
    :func:`choose`)."""
    name = choose(op, x.device.type, x.dtype, case, choice)
    return name, implementation(op, name)
