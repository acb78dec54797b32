"""Lazy access to the compiled extension ``effikern._C``.

Importing effikern never needs the extension (or a GPU): a missing or broken build only fails when a
backend that needs it is asked for, and the error says how to build it.
"""

import functools
import importlib

BUILD_HINT = (
    "build it from the source tree with `pip install --no-build-isolation -e .` "
    "(without EFFIKERN_NO_EXT=1; CUDA kernels also need a CUDA build of torch and nvcc, or FORCE_CUDA=1)"
)


@functools.lru_cache(maxsize=None)
def _load():
    """Returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module("effikern._C"), None
    except ImportError as err:  # not built, or built against another torch
        return None, f"effikern._C could not be imported ({err})"


def extension():
    """The extension module, or None when it is not built."""
    return _load()[0]


def extension_error():
    """Why the extension is unavailable, or None when it loaded."""
    return _load()[1]


def require(feature: str = "cpu"):
    """The extension module; raises RuntimeError naming the build step when it (or its CUDA part) is missing."""
    ext, reason = _load()
    if ext is None:
        raise RuntimeError(f"{reason}: {BUILD_HINT}")
    if feature == "cuda" and not ext.build_info()["cuda"]:
        raise RuntimeError(f"effikern._C was built without CUDA kernels: {BUILD_HINT}")
    return ext
