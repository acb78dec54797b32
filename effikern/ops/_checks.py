"""Argument checks shared by the ops. Every failure names the argument, what was expected and what was given."""

from typing import Optional, Sequence, Tuple

import torch


def pair(value, name: str, minimum: int, maximum: Optional[int] = None) -> Tuple[int, int]:
    """An int or a pair of ints -> (int, int), each >= minimum (and <= maximum when given)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in value):
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    if maximum is not None and any(v > maximum for v in value):
        raise ValueError(f"{name} must be <= {maximum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


def tensor(t, name: str, ndim: int = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(t.shape)}")
    return t


def shape(t: torch.Tensor, name: str, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def same_dtype_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    """Every tensor in ``others`` (None allowed) has ref's dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def floating(t: torch.Tensor, name: str, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout an output should follow: channels_last when ``x``'s channels are innermost, else NCHW.

    Matches ``F.conv2d``'s own rule closely enough for contiguous inputs, and decides strided views by
    which stride is smallest, so a sliced channels_last tensor stays channels_last.
    """
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if x.stride(1) <= min(x.stride(2), x.stride(3)) else torch.contiguous_format
