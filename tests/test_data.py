"""effikern.data: padding, length-grouped batching and padding statistics."""

import collections

import pytest
import torch
from torch.utils.data import DataLoader

from effikern.data import DynamicPaddingCollator, LengthGroupedBatchSampler, pad_fixed, padding_stats


def lognormal_lengths(n, median=128, sigma=0.8, longest=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    return (torch.log(torch.tensor(float(median))) + sigma * z).exp().round().clamp(1, longest).long()


def flatten(batches):
    return [i for b in batches for i in b]


def rank_batches(lengths, replicas, epoch=0, **kw):
    out = []
    for r in range(replicas):
        s = LengthGroupedBatchSampler(lengths, num_replicas=replicas, rank=r, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


# --- LengthGroupedBatchSampler: coverage -------------------------------------------------------------------


@pytest.mark.parametrize("n,batch_size,mult", [(1000, 32, 50), (1000, 32, 3), (7, 3, 1), (1, 4, 50)])
def test_every_index_once_without_drop_last(n, batch_size, mult):
    s = LengthGroupedBatchSampler(lognormal_lengths(n), batch_size, mega_batch_mult=mult)
    batches = list(s)
    assert sorted(flatten(batches)) == list(range(n))
    assert len(s) == len(batches) == -(-n // batch_size)
    assert sum(len(b) < batch_size for b in batches) == (1 if n % batch_size else 0)
    assert all(isinstance(i, int) for i in flatten(batches))


def test_drop_last_drops_exactly_the_incomplete_batch():
    n, bs = 1000, 32
    lengths = lognormal_lengths(n)
    kept = LengthGroupedBatchSampler(lengths, bs, drop_last=True)
    full = LengthGroupedBatchSampler(lengths, bs, drop_last=False)
    batches, all_batches = list(kept), list(full)
    assert len(kept) == len(batches) == n // bs
    assert all(len(b) == bs for b in batches)
    missing = set(range(n)) - set(flatten(batches))
    assert len(flatten(batches)) == len(set(flatten(batches)))  # still no repeats
    short = [b for b in all_batches if len(b) < bs]
    assert len(short) == 1 and missing == set(short[0]) and len(missing) == n % bs


def test_drop_last_fewer_sequences_than_batch_size_yields_nothing():
    s = LengthGroupedBatchSampler([5, 3, 2], 4, drop_last=True)
    assert list(s) == [] and len(s) == 0


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_ranks_get_disjoint_batches_of_equal_count(replicas):
    n, bs = 1000, 10  # 100 batches: a multiple of 2 and 4, not of 3
    per_rank = rank_batches(lognormal_lengths(n), replicas, batch_size=bs, epoch=3)
    counts = {len(b) for b in per_rank}
    assert counts == {-(-100 // replicas)}
    seen = collections.Counter(flatten(flatten(per_rank)))
    assert set(seen) == set(range(n))  # every sequence somewhere
    padded = -(-100 // replicas) * replicas - 100  # batches repeated to even the ranks
    assert sum(c - 1 for c in seen.values()) == padded * bs
    if padded == 0:
        sets = [set(flatten(b)) for b in per_rank]
        assert all(not (sets[a] & sets[b]) for a in range(replicas) for b in range(a + 1, replicas))


@pytest.mark.parametrize("replicas", [2, 3])
def test_ranks_with_drop_last_are_disjoint_and_equal(replicas):
    n, bs = 1005, 10  # 100 full batches + 1 short one
    per_rank = rank_batches(lognormal_lengths(n), replicas, batch_size=bs, drop_last=True, epoch=1)
    assert {len(b) for b in per_rank} == {100 // replicas}
    everything = flatten(flatten(per_rank))
    assert len(everything) == len(set(everything)) == (100 // replicas) * replicas * bs
    assert all(len(b) == bs for rank in per_rank for b in rank)


def test_more_ranks_than_batches_each_rank_gets_one():
    per_rank = rank_batches(list(range(1, 6)), 4, batch_size=2)  # 3 batches, 4 ranks
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert set(flatten(flatten(per_rank))) == set(range(5))


# --- LengthGroupedBatchSampler: determinism and grouping -------------------------------------------------


def test_deterministic_per_seed_and_epoch_and_different_across_epochs():
    lengths = lognormal_lengths(2000)

    def epoch_batches(seed, epoch):
        s = LengthGroupedBatchSampler(lengths, 16, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert epoch_batches(0, 2) == epoch_batches(0, 2)
    assert epoch_batches(0, 0) != epoch_batches(0, 1)
    assert epoch_batches(0, 1) != epoch_batches(1, 0)  # seed and epoch do not just add up
    assert epoch_batches(0, 0) != epoch_batches(1, 0)
    s = LengthGroupedBatchSampler(lengths, 16, seed=5)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first


def test_no_shuffle_keeps_mega_batches_in_dataset_order():
    lengths = torch.tensor([1, 9, 2, 8, 3, 7, 4, 6])
    s = LengthGroupedBatchSampler(lengths, 2, shuffle=False, mega_batch_mult=2)
    assert list(s) == [[1, 3], [2, 0], [5, 7], [6, 4]]


def _mean_ratio(lengths, batches):
    return sum(float(lengths[b].max() / lengths[b].min()) for b in batches) / len(batches)


def test_batches_group_similar_lengths():
    lengths = lognormal_lengths(5000, sigma=1.0)
    batches = list(LengthGroupedBatchSampler(lengths, 32))
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(1))
    random_batches = perm.split(32)
    grouped, random = _mean_ratio(lengths, batches), _mean_ratio(lengths, random_batches)
    assert grouped < 1.5 and random > 10 * grouped
    for b in batches:  # each batch is sorted longest first
        assert lengths[b].tolist() == sorted(lengths[b].tolist(), reverse=True)
    # The batch order is shuffled: not one long-to-short sweep.
    firsts = torch.tensor([int(lengths[b[0]]) for b in batches], dtype=torch.float)
    assert not bool((firsts[1:] <= firsts[:-1]).all())


# --- LengthGroupedBatchSampler: token budget ---------------------------------------------------------------


@pytest.mark.parametrize("replicas", [1, 2])
def test_token_budget_respected_and_everything_covered(replicas):
    lengths = lognormal_lengths(3000)
    budget = 4096
    per_rank = rank_batches(lengths, replicas, batch_size=64, max_tokens=budget, epoch=2)
    assert len({len(b) for b in per_rank}) == 1
    for b in flatten(per_rank):
        assert len(b) * int(lengths[b].max()) <= budget and len(b) <= 64
    assert set(flatten(flatten(per_rank))) == set(range(3000))
    # The budget is used well: padded batches are mostly close to full.
    sizes = [len(b) * int(lengths[b].max()) for b in flatten(per_rank)]
    assert sum(sizes) / len(sizes) > 0.8 * budget


def test_token_budget_len_follows_the_epoch():
    s = LengthGroupedBatchSampler(lognormal_lengths(3000), 64, max_tokens=4096)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert len(s) == len(list(s))


def test_token_budget_smaller_than_a_sequence_raises():
    with pytest.raises(ValueError, match=r"max_tokens=100.*lengths\[1\] = 300"):
        LengthGroupedBatchSampler([50, 300, 20], 4, max_tokens=100)


def test_works_as_a_dataloader_batch_sampler():
    seqs = [torch.arange(1, n + 1) for n in lognormal_lengths(200, median=16).tolist()]
    sampler = LengthGroupedBatchSampler([len(s) for s in seqs], 8, mega_batch_mult=4)
    loader = DataLoader(seqs, batch_sampler=sampler, collate_fn=DynamicPaddingCollator())
    total = 0
    for batch in loader:
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        total += int(batch["attention_mask"].sum())
    assert total == sum(len(s) for s in seqs)


# --- pad_fixed -------------------------------------------------------------------------------------------


def test_pad_fixed_right_and_left_truncation():
    seqs = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7]), torch.tensor([], dtype=torch.long)]
    ids, mask = pad_fixed(seqs, 4, padding_value=-1)
    assert ids.tolist() == [[1, 2, 3, 4], [6, 7, -1, -1], [-1, -1, -1, -1]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]] and mask.dtype == torch.long
    ids, mask = pad_fixed([[1, 2, 3, 4, 5], [6, 7]], 3, truncation="left")
    assert ids.tolist() == [[3, 4, 5], [6, 7, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ids.dtype == torch.long


def test_pad_fixed_keeps_dtype_and_matches_mask():
    lengths = lognormal_lengths(64, median=20, longest=100)
    seqs = [torch.randint(1, 1000, (n,), dtype=torch.int32) for n in lengths.tolist()]
    ids, mask = pad_fixed(seqs, 50)
    assert ids.shape == mask.shape == (64, 50) and ids.dtype == torch.int32
    assert mask.sum(1).tolist() == lengths.clamp(max=50).tolist()
    assert bool((ids[mask == 0] == 0).all()) and bool((ids[mask == 1] > 0).all())


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(sequences=[], max_length=4), ValueError, "sequences must not be empty"),
    (dict(sequences=[[1]], max_length=0), ValueError, "max_length must be >= 1, got 0"),
    (dict(sequences=[[1]], max_length=2.0), TypeError, "max_length must be an int"),
    (dict(sequences=[[1]], max_length=2, truncation="middle"), ValueError, "truncation must be one of"),
    (dict(sequences=[torch.ones(2, 2)], max_length=2), ValueError, r"sequences\[0\] must be a 1-D tensor"),
    (dict(sequences=[[1], ["a"]], max_length=2), TypeError, r"sequences\[1\] must be a list of ints"),
    (dict(sequences=torch.ones(2, 3), max_length=2), TypeError, "sequences must be a list"),
    (dict(sequences=[torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int64)], max_length=2),
     TypeError, "one dtype"),
])
def test_pad_fixed_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        pad_fixed(**kwargs)


# --- DynamicPaddingCollator ------------------------------------------------------------------------------


def test_collator_pads_to_longest_with_masks_and_label_padding():
    batch = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": torch.tensor([8]), "labels": [4]}]
    out = DynamicPaddingCollator(padding_value=9)(batch)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


def test_collator_pad_to_multiple_of():
    collate = DynamicPaddingCollator(pad_to_multiple_of=8, label_padding_value=-1)
    out = collate([{"input_ids": list(range(1, 10)), "labels": list(range(9))},
                   {"input_ids": [1], "labels": [0]}])
    assert out["input_ids"].shape == out["attention_mask"].shape == out["labels"].shape == (2, 16)
    assert out["attention_mask"].sum().item() == 10
    assert out["labels"][1, 1:].eq(-1).all() and out["input_ids"][1, 1:].eq(0).all()
    exact = collate([{"input_ids": list(range(8)), "labels": list(range(8))}])
    assert exact["input_ids"].shape == (1, 8)  # already a multiple: no extra padding


def test_collator_list_of_sequences():
    out = DynamicPaddingCollator()([[1, 2], [3, 4, 5, 6]])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_collator_scalar_and_passthrough_fields():
    batch = [{"input_ids": [1, 2], "labels": 3, "weight": 0.5, "emb": torch.ones(4), "id": "a"},
             {"input_ids": [1], "labels": torch.tensor(1), "weight": 2.0, "emb": torch.zeros(4), "id": "b"}]
    out = DynamicPaddingCollator()(batch)
    assert out["labels"].tolist() == [3, 1] and out["labels"].dtype == torch.long
    assert out["weight"].tolist() == [0.5, 2.0] and out["weight"].dtype == torch.float32
    assert out["emb"].shape == (2, 4)
    assert out["id"] == ["a", "b"]


def test_collator_keeps_a_given_attention_mask_and_pads_extra_keys():
    batch = [{"input_ids": [1, 2, 3], "attention_mask": [1, 0, 1], "token_type_ids": [0, 1, 1]},
             {"input_ids": [4], "attention_mask": [1], "token_type_ids": [0]}]
    out = DynamicPaddingCollator(keys=("input_ids", "token_type_ids"), padding_value=7)(batch)
    assert out["attention_mask"].tolist() == [[1, 0, 1], [1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0, 1, 1], [0, 7, 7]]


@pytest.mark.parametrize("batch,err,match", [
    ([], ValueError, "batch must not be empty"),
    ({"input_ids": [1]}, TypeError, "batch must be a list"),
    ([{"input_ids": [1]}, [2]], TypeError, "all dicts or all sequences"),
    ([{"input_ids": [1]}, {"input_ids": [1], "labels": [1]}], ValueError, r"batch\[1\] has keys"),
    ([{"text": [1]}], ValueError, "lack the keys"),
])
def test_collator_errors(batch, err, match):
    with pytest.raises(err, match=match):
        DynamicPaddingCollator()(batch)


def test_collator_bad_arguments():
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1, got 0"):
        DynamicPaddingCollator(pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="keys must not contain"):
        DynamicPaddingCollator(keys=("input_ids", "labels"))


# --- argument errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(lengths=[]), ValueError, "lengths must not be empty"),
    (dict(lengths=[3, -1]), ValueError, r"lengths must be >= 0, got lengths\[1\] = -1"),
    (dict(lengths=[1.5, 2.0]), TypeError, "lengths must hold integers"),
    (dict(lengths=[[1, 2]]), ValueError, "lengths must be 1-D"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
    (dict(batch_size=True), TypeError, "batch_size must be an int"),
    (dict(mega_batch_mult=0), ValueError, "mega_batch_mult must be >= 1"),
    (dict(max_tokens=0), ValueError, "max_tokens must be >= 1"),
    (dict(num_replicas=2, rank=2), ValueError, r"rank must be in \[0, num_replicas=2\), got rank=2"),
    (dict(num_replicas=0, rank=0), ValueError, "num_replicas must be >= 1"),
    (dict(rank=-1), ValueError, "rank must be >= 0"),
])
def test_sampler_errors(kwargs, err, match):
    args = dict(lengths=[3, 1, 2], batch_size=2)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        LengthGroupedBatchSampler(**args)


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        LengthGroupedBatchSampler([1, 2], 1).set_epoch(-1)


# --- padding_stats ---------------------------------------------------------------------------------------


def test_padding_stats_fixed_by_hand():
    st = padding_stats([1, 2, 3, 10, 4], 2, "fixed", max_length=4)
    assert (st.real_tokens, st.total_tokens, st.pad_tokens, st.truncated_tokens) == (14, 20, 6, 6)
    assert st.num_batches == 3 and st.max_batch_tokens == 8 and st.padding_fraction == pytest.approx(0.3)
    assert padding_stats([1, 2, 3], 2, "fixed").total_tokens == 9  # default width: the longest
    assert padding_stats([1, 2, 3], 2, "fixed", pad_to_multiple_of=8).total_tokens == 24


def test_padding_stats_bucketed_matches_the_sampler_and_collator():
    lengths = lognormal_lengths(2000)
    st = padding_stats(lengths, 32, "bucketed", pad_to_multiple_of=8, seed=3)
    batches = list(LengthGroupedBatchSampler(lengths, 32, seed=3))
    collate = DynamicPaddingCollator(pad_to_multiple_of=8)
    total = sum(collate([[0] * int(lengths[i]) for i in b])["input_ids"].numel() for b in batches)
    assert st.total_tokens == total and st.real_tokens == int(lengths.sum())
    budget = padding_stats(lengths, 64, "bucketed", max_tokens=4096)
    assert budget.max_batch_tokens <= 4096


def test_padding_stats_orders_the_strategies():
    lengths = lognormal_lengths(5000)
    fixed, dynamic, bucketed = (padding_stats(lengths, 32, s, max_length=1024) for s in ("fixed", "dynamic",
                                                                                          "bucketed"))
    assert fixed.real_tokens == dynamic.real_tokens == bucketed.real_tokens
    assert fixed.padding_fraction > dynamic.padding_fraction > 3 * bucketed.padding_fraction
    assert bucketed.padding_fraction < 0.1
    assert "padding" in str(bucketed) and bucketed.as_dict()["strategy"] == "bucketed"


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(strategy="sorted"), ValueError, "strategy must be one of"),
    (dict(lengths=[]), ValueError, "lengths must not be empty"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(max_length=0), ValueError, "max_length must be >= 1"),
    (dict(max_tokens=64), ValueError, "max_tokens applies to strategy='bucketed' only"),
    (dict(strategy="bucketed", max_tokens=2), ValueError, "max_tokens=2 is smaller"),
])
def test_padding_stats_errors(kwargs, err, match):
    args = dict(lengths=[3, 1, 2], batch_size=2, strategy="dynamic")
    args.update(kwargs)
    with pytest.raises(err, match=match):
        padding_stats(**args)
