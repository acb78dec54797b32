"""Collating one epoch of token sequences: fixed padding vs dynamic padding vs length-grouped batches.

Dataset: lengths drawn lognormal (median 128 tokens, sigma 0.8, clipped to [1, 1024]), 100k sequences (20k
quick), batch size 32, random int64 token ids. Each candidate runs a whole epoch of ``collate_fn`` calls:

- ``fixed`` (baseline): shuffled batches, :func:`effikern.data.pad_fixed` to 1024;
- ``dynamic``: the same shuffled batches, :class:`DynamicPaddingCollator` (pad_to_multiple_of=8);
- ``bucketed``: :class:`LengthGroupedBatchSampler` batches (a new epoch each call, so its plan is timed too),
  same collator.

Collation runs on the CPU (in DataLoader workers) whatever ``device`` is: the GPU gains come from the smaller
batches, which :func:`report` counts. ``bytes`` is the padding-free minimum (read the real tokens,
write them and their mask once), so ``%copy`` shows how close each strategy is to copying no padding.
"""

import itertools

import torch

from effikern.data import DynamicPaddingCollator, LengthGroupedBatchSampler, pad_fixed, padding_stats

from .runner import Case

FAMILY = "data"

MEDIAN, SIGMA, MAX_LENGTH = 128, 0.8, 1024
BATCH_SIZE = 32
PAD_TO_MULTIPLE_OF = 8  # what one would use for fp16/bf16 tensor cores
STRATEGIES = ("fixed", "dynamic", "bucketed")
SEED = 0


def _num_sequences(quick: bool) -> int:
    return 20_000 if quick else 100_000


def _shape(quick: bool) -> str:
    return f"{_num_sequences(quick) // 1000}k seqs b{BATCH_SIZE}"


def lengths(n: int) -> torch.Tensor:
    """(n,) int64 lognormal lengths, the same every call (seeded)."""
    z = torch.randn(n, generator=torch.Generator().manual_seed(SEED))
    mu = torch.log(torch.tensor(float(MEDIAN)))
    return (mu + SIGMA * z).exp().round().clamp(1, MAX_LENGTH).long()


def _sequences(lens: torch.Tensor):
    """One flat random tensor split into views: building 100k sequences costs one allocation."""
    flat = torch.randint(1, 30_000, (int(lens.sum()),), generator=torch.Generator().manual_seed(SEED + 1))
    return list(torch.split(flat, lens.tolist()))


def _epoch_fns(seqs, lens):
    """{strategy: zero-argument callable that collates one epoch}."""
    n = len(seqs)
    collate = DynamicPaddingCollator(pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
    sampler = LengthGroupedBatchSampler(lens, BATCH_SIZE, seed=SEED)
    epochs = itertools.count()
    generator = torch.Generator().manual_seed(SEED)  # not the global RNG: timing must not disturb it

    def random_batches():
        return torch.randperm(n, generator=generator).split(BATCH_SIZE)

    def fixed():
        for batch in random_batches():
            pad_fixed([seqs[i] for i in batch.tolist()], MAX_LENGTH)

    def dynamic():
        for batch in random_batches():
            collate([seqs[i] for i in batch.tolist()])

    def bucketed():
        sampler.set_epoch(next(epochs))  # a fresh epoch: the sampler's cached plan must not be reused
        for batch in sampler:
            collate([seqs[i] for i in batch])

    return {"fixed": fixed, "dynamic": dynamic, "bucketed": bucketed}


def cases(device, quick):
    n = _num_sequences(quick)
    real = int(lengths(n).sum())

    def build():
        lens = lengths(n)
        return _epoch_fns(_sequences(lens), lens)

    # Case.mode is one value per case and speedups only compare candidates of one case, so the strategies are
    # the candidates ("backend" column) and mode says what is timed.
    return [Case(op="collate_epoch", shape=_shape(quick), dtype="int64", layout="-", mode="epoch",
                 bytes=3 * 8 * real, flops=0, baseline="fixed", build=build)]


def report(quick):
    """Tokens processed per strategy for the timed dataset: a list of dicts (one per strategy), each
    :class:`effikern.data.PaddingStats` fields plus ``family``, ``shape`` and ``tokens_vs_fixed`` (the
    strategy's total tokens over fixed padding's: the fraction of the model's work that is left)."""
    lens = lengths(_num_sequences(quick))
    stats = {s: padding_stats(lens, BATCH_SIZE, s, max_length=MAX_LENGTH,
                              pad_to_multiple_of=None if s == "fixed" else PAD_TO_MULTIPLE_OF, seed=SEED)
             for s in STRATEGIES}
    fixed_total = stats["fixed"].total_tokens
    return [{"family": FAMILY, "shape": _shape(quick), **st.as_dict(),
             "pad_to_multiple_of": None if s == "fixed" else PAD_TO_MULTIPLE_OF,
             "tokens_vs_fixed": st.total_tokens / fixed_total} for s, st in stats.items()]
