"""How many tokens a batching strategy makes the model process, and how many of them are padding.

Computed from the lengths alone (no data is padded), vectorized over batches, so it is cheap to ask for
millions of sequences before choosing a strategy.
"""

import dataclasses
from typing import Optional

import torch

from .padding import check_int
from .sampler import as_lengths, epoch_generator, grouped_batches

__all__ = ["PaddingStats", "STRATEGIES", "padding_stats"]

STRATEGIES = ("fixed", "dynamic", "bucketed")


@dataclasses.dataclass(frozen=True)
class PaddingStats:
    """Token counts for one epoch of one strategy.

    ``total_tokens = real_tokens + pad_tokens`` is what the model processes (the sum over batches of
    batch rows x padded width); ``padding_fraction = pad_tokens / total_tokens``. ``truncated_tokens`` were
    cut by ``max_length`` and are in neither count. ``max_batch_tokens`` is the largest batch's rows x width
    (what sizes activation memory).
    """

    strategy: str
    batch_size: int
    num_sequences: int
    num_batches: int
    real_tokens: int
    pad_tokens: int
    total_tokens: int
    padding_fraction: float
    truncated_tokens: int
    max_batch_tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.strategy}: {self.total_tokens:,} tokens processed for {self.real_tokens:,} real "
                f"({100 * self.padding_fraction:.1f}% padding) in {self.num_batches:,} batches")


def _round_up(widths: torch.Tensor, multiple: Optional[int]) -> torch.Tensor:
    return widths if not multiple else (widths + multiple - 1) // multiple * multiple


def _random_batch_widths(lengths: torch.Tensor, batch_size: int, seed: int):
    """Dynamic padding on a plain shuffled order: (rows, width) per batch, each (B,)."""
    n = lengths.numel()
    shuffled = lengths[torch.randperm(n, generator=epoch_generator(seed, 0))]
    num_batches = -(-n // batch_size)
    # Zero-length filler never raises a batch's maximum, so the last, short batch reshapes like the rest.
    filled = torch.cat([shuffled, shuffled.new_zeros(num_batches * batch_size - n)])
    widths = filled.view(num_batches, batch_size).amax(dim=1)
    rows = torch.full((num_batches,), batch_size, dtype=torch.long)
    rows[-1] = n - (num_batches - 1) * batch_size
    return rows, widths


def _grouped_batch_widths(lengths, batch_size, seed, mega_batch_mult, max_tokens):
    """Length-grouped batches (LengthGroupedBatchSampler's epoch 0): each batch is longest first, so its width
    is its first sequence's length."""
    order, rows = grouped_batches(lengths, batch_size, mega_batch_mult, epoch_generator(seed, 0), max_tokens)
    starts = torch.cumsum(rows, 0) - rows
    return rows, lengths[order[starts]]


def padding_stats(lengths, batch_size: int, strategy: str, max_length: Optional[int] = None,
                  pad_to_multiple_of: Optional[int] = None, mega_batch_mult: int = 50,
                  max_tokens: Optional[int] = None, seed: int = 0) -> PaddingStats:
    """Padding of one epoch of ``lengths`` (N,) in batches of ``batch_size``.

    Strategies:
        ``"fixed"``: every sequence padded to ``max_length`` (default: the longest length), as
            :func:`pad_fixed` does.
        ``"dynamic"``: random batches (shuffled with ``seed``), each padded to its longest, as
            :class:`DynamicPaddingCollator` does.
        ``"bucketed"``: :class:`LengthGroupedBatchSampler` batches (``seed``, epoch 0, ``mega_batch_mult``,
            ``max_tokens``) padded as in ``"dynamic"``.

    ``max_length`` truncates longer sequences first in every strategy; ``pad_to_multiple_of`` rounds every
    width up (the fixed one too). ``max_tokens`` is for ``"bucketed"`` only: then ``batch_size`` caps the
    rows per batch.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    lengths = as_lengths(lengths)
    batch_size = check_int("batch_size", batch_size, 1)
    max_length = check_int("max_length", max_length, 1, allow_none=True)
    multiple = check_int("pad_to_multiple_of", pad_to_multiple_of, 1, allow_none=True)
    mega_batch_mult = check_int("mega_batch_mult", mega_batch_mult, 1)
    max_tokens = check_int("max_tokens", max_tokens, 1, allow_none=True)
    if max_tokens is not None and strategy != "bucketed":
        raise ValueError(f"max_tokens applies to strategy='bucketed' only, got strategy={strategy!r}")

    kept = lengths if max_length is None else lengths.clamp(max=max_length)
    if max_tokens is not None and int(kept.max()) > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is smaller than the longest (truncated) sequence, "
                         f"{int(kept.max())}: it fits no batch")
    n = kept.numel()
    if strategy == "fixed":
        width = int(kept.max()) if max_length is None else max_length
        rows = torch.full((-(-n // batch_size),), batch_size, dtype=torch.long)
        rows[-1] = n - (rows.numel() - 1) * batch_size
        widths = torch.full_like(rows, width)
    elif strategy == "dynamic":
        rows, widths = _random_batch_widths(kept, batch_size, seed)
    else:
        rows, widths = _grouped_batch_widths(kept, batch_size, seed, mega_batch_mult, max_tokens)
    batch_tokens = rows * _round_up(widths, multiple)
    real, total = int(kept.sum()), int(batch_tokens.sum())
    fraction = (total - real) / total if total else 0.0  # all-empty sequences: nothing padded
    return PaddingStats(
        strategy=strategy, batch_size=batch_size, num_sequences=n, num_batches=rows.numel(), real_tokens=real,
        pad_tokens=total - real, total_tokens=total, padding_fraction=fraction,
        truncated_tokens=int((lengths - kept).sum()), max_batch_tokens=int(batch_tokens.max()),
    )
