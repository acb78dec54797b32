"""Less padding in transformer batches: fixed and dynamic padding, length-grouped batching, padding stats.

- :func:`pad_fixed`: (N, max_length) ``input_ids`` and ``attention_mask``, truncating on the right or left;
- :class:`DynamicPaddingCollator`: a DataLoader ``collate_fn`` that pads each batch to its own longest;
- :class:`LengthGroupedBatchSampler`: a DataLoader ``batch_sampler`` of similar-length batches (by count or
  by token budget), deterministic per (seed, epoch) and split between distributed ranks;
- :func:`padding_stats`: tokens processed and padding fraction of each strategy, from the lengths alone.

Typical use::

    sampler = LengthGroupedBatchSampler(lengths, batch_size=32, seed=0)
    collate = DynamicPaddingCollator(pad_to_multiple_of=8)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...
"""

from .padding import DynamicPaddingCollator, pad_fixed
from .sampler import LengthGroupedBatchSampler
from .stats import PaddingStats, padding_stats

__all__ = ["DynamicPaddingCollator", "LengthGroupedBatchSampler", "PaddingStats", "pad_fixed",
           "padding_stats"]
