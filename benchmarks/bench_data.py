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

A second case, ``train_epoch``, shows what the padding costs end to end: the same first sequences of the
dataset (64 quick, 512 full; on GPU 4096) are trained for one pass through a small transformer encoder
(:class:`TinyEncoder`, 2 layers, d=64 on CPU and 256 on GPU) with each strategy's batches: forward, masked
token loss, backward and an SGD step per batch. Every strategy trains on exactly the same tokens; only the
padding differs.
"""

import itertools

import torch
from torch import nn

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
    collate_case = Case(op="collate_epoch", shape=_shape(quick), dtype="int64", layout="-", mode="epoch",
                        bytes=3 * 8 * real, flops=0, baseline="fixed", build=build)
    return [collate_case, _train_case(device, quick)]


class TinyEncoder(nn.Module):
    """Token embedding + positional embedding, ``layers`` pre-norm encoder layers, a vocabulary head.

    forward(input_ids [B, L] int64, attention_mask [B, L] bool) -> logits [B, L, vocab]; padded positions are
    masked out of attention (``src_key_padding_mask``), so they cost time but do not change real tokens."""

    def __init__(self, vocab: int, d_model: int, layers: int, max_length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=max(1, d_model // 32), dim_feedforward=4 * d_model,
                                           batch_first=True, norm_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embed(input_ids) + self.position(positions)
        return self.head(self.encoder(h, src_key_padding_mask=~attention_mask))


TRAIN_VOCAB = 1000


def _train_count(quick: bool, device) -> int:
    """How many sequences the training case trains on."""
    return 4096 if device.type == "cuda" else (64 if quick else 512)


def _train_sequences(quick: bool, device):
    """(sequences, lengths [n]) for the training case: the dataset's first n lengths, random token ids."""
    lens = lengths(_train_count(quick, device))
    flat = torch.randint(1, TRAIN_VOCAB, (int(lens.sum()),), generator=torch.Generator().manual_seed(SEED + 2))
    return list(torch.split(flat, lens.tolist())), lens


def _train_epoch_fns(device, quick):
    seqs, lens = _train_sequences(quick, device)
    d_model = 256 if device.type == "cuda" else 64
    torch.manual_seed(SEED)
    model = TinyEncoder(TRAIN_VOCAB, d_model, layers=2, max_length=MAX_LENGTH).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    collate = DynamicPaddingCollator(pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
    sampler = LengthGroupedBatchSampler(lens, BATCH_SIZE, seed=SEED)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(SEED)).split(BATCH_SIZE)
    plans = {"fixed": [b.tolist() for b in order], "dynamic": [b.tolist() for b in order],
             "bucketed": list(sampler)}

    def step(ids, mask):
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids, mask)
        # Predict each token from itself (a stand-in objective): only the cost matters; pads are ignored.
        loss = loss_fn(logits.flatten(0, 1), ids.masked_fill(~mask, -100).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def epoch(strategy):
        for batch in plans[strategy]:
            chosen = [seqs[i] for i in batch]
            if strategy == "fixed":
                ids, mask = pad_fixed(chosen, MAX_LENGTH)
            else:
                out = collate(chosen)
                ids, mask = out["input_ids"], out["attention_mask"]
            step(ids, mask.bool())

    return {s: (lambda s=s: epoch(s)) for s in STRATEGIES}


def _train_case(device, quick):
    n = _train_count(quick, device)
    # bytes/flops have no floor meaning for a whole training step (0 = not reported); the row is the epoch time.
    return Case(op="train_epoch", shape=f"{n} seqs b{BATCH_SIZE} tiny-encoder", dtype="fp32", layout="-",
                mode="epoch", bytes=0, flops=0, baseline="fixed", build=lambda: _train_epoch_fns(device, quick))


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
