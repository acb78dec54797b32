"""Length-grouped batching: batches of similar lengths, so dynamic padding has little left to pad.

Per epoch (all of it vectorized except the greedy cut of token-budget batches, a loop over batches):

1. shuffle all indices (``torch.randperm`` with a generator seeded from (seed, epoch));
2. cut the shuffled order into mega-batches of ``mega_batch_mult * batch_size`` indices and sort each one by
   length, longest first (one stable sort on a composite key);
3. cut each mega-batch into batches (``batch_size`` indices, or as many as fit ``max_tokens``), never across
   a mega-batch boundary;
4. shuffle the batches, so training does not see a long-to-short sweep inside every mega-batch;
5. split the batches between the ranks.

Randomness comes from step 1 and 4, so lengths stay grouped (step 2) while which sequences meet still
changes every epoch.
"""

from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Sampler

from .padding import check_int

__all__ = ["LengthGroupedBatchSampler", "as_lengths", "grouped_batches"]

_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads seeds so (seed, epoch) pairs do not collide


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that is a function of (seed, epoch) only, identical on every rank.

    ``seed + epoch`` (DistributedSampler's choice) would give seed=0/epoch=1 the same order as seed=1/epoch=0.
    """
    return torch.Generator().manual_seed((seed * _GOLDEN + epoch) & _MASK63)


def as_lengths(lengths, name: str = "lengths") -> torch.Tensor:
    """Sequence lengths (list of ints, 1-D integer tensor or array) -> (N,) int64 tensor; N >= 1, all >= 0."""
    if isinstance(lengths, (str, bytes)):
        raise TypeError(f"{name} must be a list of ints or a 1-D integer tensor, "
                        f"got {type(lengths).__name__}")
    try:
        t = torch.as_tensor(lengths)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a list of ints or a 1-D integer tensor, got "
                        f"{type(lengths).__name__} ({err})") from None
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:  # checked before the dtype: torch.as_tensor([]) is float32
        raise ValueError(f"{name} must not be empty, got 0 lengths")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    t = t.to(torch.long)
    if bool((t < 0).any()):
        i = int(torch.nonzero(t < 0)[0])
        raise ValueError(f"{name} must be >= 0, got {name}[{i}] = {int(t[i])}")
    return t


def _sort_mega_batches(lengths: torch.Tensor, order: torch.Tensor, mega: int) -> torch.Tensor:
    """``order`` (N,) with each consecutive chunk of ``mega`` indices re-sorted by length, longest first."""
    chunk = torch.arange(order.numel()) // mega
    # One sort on (chunk ascending, length descending); stable, so equal lengths keep the shuffled order.
    key = chunk * (int(lengths.max()) + 1) + (lengths.max() - lengths[order])
    return order[torch.sort(key, stable=True).indices]


def _token_budget_sizes(sorted_lengths: List[int], mega: int, batch_size: int, max_tokens: int) -> List[int]:
    """Greedy batch sizes over longest-first mega-batches: a batch starting at a sequence of length L takes
    min(batch_size, max_tokens // L) sequences (its first is its longest, so padded size <= max_tokens)."""
    sizes, start, n = [], 0, len(sorted_lengths)
    while start < n:
        mega_end = min((start // mega + 1) * mega, n)
        longest = sorted_lengths[start]
        fit = batch_size if longest == 0 else max(1, min(batch_size, max_tokens // longest))
        size = min(fit, mega_end - start)
        sizes.append(size)
        start += size
    return sizes


def grouped_batches(lengths: torch.Tensor, batch_size: int, mega_batch_mult: int,
                    generator: Optional[torch.Generator], max_tokens: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3: ``(order, sizes)``; ``order`` (N,) is every index once, ``sizes`` (B,) the consecutive batch
    sizes (sum N). Each batch is longest first. ``generator=None``: no shuffle (mega-batches of 0..N-1)."""
    n = lengths.numel()
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    mega = mega_batch_mult * batch_size
    order = _sort_mega_batches(lengths, order, mega)
    if max_tokens is None:
        # mega is a multiple of batch_size, so fixed-size chunks never straddle two mega-batches.
        sizes = torch.full((n // batch_size,), batch_size, dtype=torch.long)
        if n % batch_size:
            sizes = torch.cat([sizes, torch.tensor([n % batch_size])])
        return order, sizes
    return order, torch.tensor(_token_budget_sizes(lengths[order].tolist(), mega, batch_size, max_tokens))


def _default_replicas(num_replicas: Optional[int], rank: Optional[int]) -> Tuple[int, int]:
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    num_replicas = check_int("num_replicas", num_replicas, 1)
    rank = check_int("rank", rank, 0)
    if rank >= num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got rank={rank}")
    return num_replicas, rank


class LengthGroupedBatchSampler(Sampler[List[int]]):
    """Yields batches (lists of dataset indices) of similar lengths; pass it as ``batch_sampler=``.

    See the module docstring for the algorithm. ``shuffle=False`` skips both shuffles (steps 1 and 4): the
    batches are the dataset order's mega-batches, each sorted longest first, in order.

    Args:
        lengths: (N,) the token count of every dataset item (what the collator will pad).
        batch_size: sequences per batch; with ``max_tokens`` it is the cap on sequences per batch.
        shuffle, seed: the order of an epoch is a function of (seed, epoch) only, so every rank must pass the
            same seed; call :meth:`set_epoch` before each epoch to get a new order.
        drop_last: count mode: drop the one incomplete batch (it holds the shortest sequences of the last
            mega-batch). Both modes: see the split between ranks below.
        mega_batch_mult: mega-batch = ``mega_batch_mult * batch_size`` indices; larger groups lengths more
            tightly, smaller keeps more randomness. 1 still sorts inside each batch (which changes nothing).
        num_replicas, rank: default to ``torch.distributed``'s world size and rank when it is initialized,
            else 1 and 0.
        max_tokens: token budget: a batch's padded size ``len(batch) * max(length in batch)`` is at most
            ``max_tokens`` (padding up to a multiple in the collator is not counted). A sequence longer than
            ``max_tokens`` cannot fit any batch: the constructor raises ValueError (so the memory budget is a
            guarantee; truncate or filter such items first).

    Split between ranks, as ``DistributedSampler`` does with indices: the B global batches of an epoch are
    made a multiple of ``num_replicas``: ``drop_last=False`` repeats batches from the start of the (shuffled)
    list, ``drop_last=True`` drops the surplus at the end; rank r takes batches r, r + R, r + 2R, ... So every
    rank gets the same number of batches, ``ceil(B / R)`` or ``floor(B / R)``, and distinct ranks get
    distinct batches except for the repeated ones. In token mode B depends on the epoch's shuffle; ``len()``
    reports the current epoch's count, so call :meth:`set_epoch` before ``len()``.
    """

    def __init__(self, lengths, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 mega_batch_mult: int = 50, num_replicas: Optional[int] = None, rank: Optional[int] = None,
                 max_tokens: Optional[int] = None):
        self.lengths = as_lengths(lengths)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.mega_batch_mult = check_int("mega_batch_mult", mega_batch_mult, 1)
        self.seed = check_int("seed", seed, -(1 << 62))
        self.max_tokens = check_int("max_tokens", max_tokens, 1, allow_none=True)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = _default_replicas(num_replicas, rank)
        if self.max_tokens is not None:
            longest = int(self.lengths.max())
            if longest > self.max_tokens:
                i = int(torch.argmax(self.lengths))
                raise ValueError(f"max_tokens={self.max_tokens} is smaller than the longest sequence "
                                 f"(lengths[{i}] = {longest}): it fits no batch; truncate or filter it first")
        self.epoch = 0
        self._cache: Optional[Tuple[int, List[List[int]]]] = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the order of this epoch (same (seed, epoch) -> same batches, on every rank)."""
        self.epoch = check_int("epoch", epoch, 0)

    def _global_batches(self) -> List[List[int]]:
        """Steps 1-4: every batch of the epoch, for all ranks."""
        generator = epoch_generator(self.seed, self.epoch) if self.shuffle else None
        order, sizes = grouped_batches(self.lengths, self.batch_size, self.mega_batch_mult, generator,
                                       self.max_tokens)
        if self.drop_last and self.max_tokens is None and int(sizes[-1]) < self.batch_size:
            sizes = sizes[:-1]
        # One tolist() and plain list slices: ~10x faster than splitting into tensors and converting each.
        flat, ends = order.tolist(), torch.cumsum(sizes, 0).tolist()
        batches = [flat[end - size:end] for end, size in zip(ends, sizes.tolist())]
        if generator is not None and batches:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _rank_batches(self) -> List[List[int]]:
        """Step 5, cached per epoch so ``len()`` then ``iter()`` computes the epoch once."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        batches = self._global_batches()
        replicas = self.num_replicas
        if self.drop_last:
            total = len(batches) - len(batches) % replicas
        else:
            total = -(-len(batches) // replicas) * replicas
        # Cyclic repeat: also covers fewer batches than ranks (each rank still gets one).
        mine = [batches[i % len(batches)] for i in range(self.rank, total, replicas)] if batches else []
        self._cache = (self.epoch, mine)
        return mine

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self._rank_batches())

    def __len__(self) -> int:
        if self.max_tokens is None:
            return self._count_mode_len()
        return len(self._rank_batches())

    def _count_mode_len(self) -> int:
        n, b, r = self.lengths.numel(), self.batch_size, self.num_replicas
        batches = n // b if self.drop_last else -(-n // b)
        return batches // r if self.drop_last else -(-batches // r)
