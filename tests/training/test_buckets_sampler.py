"""VariableVideoBatchSampler: single-bucket batches, disjoint ranks, seeded epochs and exact resume."""

from __future__ import annotations

import random

import polars as pl
import pytest

from training.bucket_report import bucket_report
from training.buckets import Bucket
from training.sampler import SampleIndex, VariableVideoBatchSampler

# Small batch sizes so a few hundred rows make many batches; keep_prob < 1 so epochs regroup.
CONFIG = {
    "256": {1: (0.7, 4), 16: (0.8, 3), 32: (1.0, 2)},
    "144p": {1: (1.0, 5), 16: (1.0, 4), 32: (0.9, 2)},
}
FI = 3


def _table(n=300, seed=0):
    rng = random.Random(seed)
    sizes = [(144, 256), (256, 144), (192, 192), (256, 256), (240, 426), (360, 640), (100, 100), (120, 300)]
    rows = []
    for _ in range(n):
        h, w = rng.choice(sizes)
        rows.append({"num_frames": rng.choice([1, 1, 20, 60, 120]), "height": h, "width": w})
    return rows


def _samplers(rows, num_replicas, **kwargs):
    bucket = Bucket(CONFIG)
    return [VariableVideoBatchSampler(rows, bucket, FI, num_replicas, rank, **kwargs) for rank in range(num_replicas)]


def _bucket_of(sampler):
    return {i: bid for bid, idx in sampler.group_by_bucket().items() for i in idx}


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_whole_single_bucket_batches(drop_last):
    rows = _table()
    samplers = _samplers(rows, 3, seed=5, drop_last=drop_last)
    where = _bucket_of(samplers[0])
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1, "every rank takes the same number of steps"
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers))
    bucket = samplers[0].bucket
    for batches in per_rank:
        for batch in batches:
            bids = {where[item.index] for item in batch}
            assert len(bids) == 1, "a batch holds one bucket"
            (bid,) = bids
            assert len(batch) == bucket.get_batch_size(bid)
            assert {(item.num_frames, item.height, item.width) for item in batch} == {bucket.get_thw(bid)}
            assert all(isinstance(item, SampleIndex) for item in batch)
    handed = [item.index for batches in per_rank for batch in batches for item in batch]
    if drop_last:
        assert len(handed) == len(set(handed)), "no sample is handed out twice in an epoch"
    else:
        assert set(handed) == set(where), "drop_last=False hands out every kept sample"
        # Repeats come only from padding: < one batch per bucket, plus < num_replicas batches to fill the last step.
        groups = samplers[0].group_by_bucket()
        max_repeats = sum(bucket.get_batch_size(b) - 1 for b in groups) + 2 * max(
            bucket.get_batch_size(b) for b in groups
        )
        assert len(handed) - len(set(handed)) <= max_repeats


def test_counts_match_the_report():
    rows = _table()
    (sampler,) = _samplers(rows, 1, seed=3, drop_last=True)
    sampler.set_epoch(4)
    report = bucket_report(rows, sampler.bucket, FI, seed=3, epoch=4)
    assert len(sampler) == sum(report.full_batches(bid) for bid in report.bucket_samples)
    assert {bid: len(idx) for bid, idx in sampler.group_by_bucket().items()} == report.bucket_samples


def test_deterministic_and_epochs_differ():
    rows = _table()
    a, b = _samplers(rows, 1, seed=11)[0], _samplers(rows, 1, seed=11)[0]
    assert list(a) == list(b)
    assert list(a) == list(a), "iterating again repeats the epoch"
    epoch0 = list(a)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch0 != epoch1
    assert _bucket_of(a) != _bucket_of(b), "the keep draws change with the epoch"
    assert list(_samplers(rows, 1, seed=12)[0]) != epoch0


def test_no_shuffle_keeps_row_order_within_buckets():
    rows = _table()
    (sampler,) = _samplers(rows, 1, shuffle=False, drop_last=True)
    for batch in sampler:
        indices = [item.index for item in batch]
        assert indices == sorted(indices)


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_resume_continues_exactly(num_replicas):
    rows = _table()
    full = [list(s) for s in _samplers(rows, num_replicas, seed=9)]
    for s in _samplers(rows, num_replicas, seed=9):
        s.set_epoch(2)
    full_e2 = []
    for s in _samplers(rows, num_replicas, seed=9):
        s.set_epoch(2)
        full_e2.append(list(s))
    assert full_e2 != full
    for epoch, reference in ((0, full), (2, full_e2)):
        for rank in range(num_replicas):
            s = _samplers(rows, num_replicas, seed=9)[rank]
            s.set_epoch(epoch)
            it = iter(s)
            got = [next(it) for _ in range(7)]
            state = s.state_dict(num_steps=5)  # a prefetching DataLoader ran 2 batches ahead of training
            assert state["consumed_batches"] == 5 * num_replicas and state["epoch"] == epoch
            resumed = _samplers(rows, num_replicas, seed=9)[rank]
            resumed.load_state_dict(state)
            resumed.set_epoch(epoch)  # what the training loop does next: harmless for the restored epoch
            assert got[:5] + list(resumed) == reference[rank]
            # after the resumed pass the next pass starts the epoch from the beginning
            assert list(resumed) == reference[rank]


def test_state_counts_consumed_batches_without_num_steps():
    rows = _table()
    (s,) = _samplers(rows, 1, seed=1)
    it = iter(s)
    for _ in range(3):
        next(it)
    assert s.state_dict()["consumed_batches"] == 3


def test_resume_with_fewer_ranks_continues_the_global_order():
    rows = _table()
    two = _samplers(rows, 2, seed=4, drop_last=True)
    it0, it1 = iter(two[0]), iter(two[1])
    for _ in range(3):
        next(it0), next(it1)
    state = two[0].state_dict(num_steps=3)
    (one,) = _samplers(rows, 1, seed=4, drop_last=True)
    whole = list(one)
    one.load_state_dict(state)
    assert list(one) == whole[6:]


def test_load_state_refuses_other_data_or_seed():
    rows = _table()
    (s,) = _samplers(rows, 1, seed=1)
    with pytest.raises(ValueError, match="seed"):
        _samplers(rows, 1, seed=2)[0].load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="rows"):
        _samplers(rows[:-1], 1, seed=1)[0].load_state_dict(s.state_dict())


def test_small_buckets_are_padded_not_lost():
    # 1 sample in a bucket of batch size 4, 2 ranks: drop_last=False repeats it, drop_last=True drops it.
    bucket = Bucket({"144p": {16: (1.0, 4)}})
    rows = [{"num_frames": 60, "height": 144, "width": 256}]
    r0, r1 = (VariableVideoBatchSampler(rows, bucket, FI, 2, rank) for rank in range(2))
    assert list(r0) == [[SampleIndex(0, 16, 144, 256)] * 4]
    assert list(r1) == list(r0)
    assert list(VariableVideoBatchSampler(rows, bucket, FI, 2, 0, drop_last=True)) == []


def test_input_forms_agree_and_errors():
    rows = _table(60)
    bucket = Bucket(CONFIG)
    as_list = list(VariableVideoBatchSampler(rows, bucket, FI, seed=3))
    as_polars = list(VariableVideoBatchSampler(pl.DataFrame(rows), bucket, FI, seed=3))
    assert as_list == as_polars
    with pytest.raises(ValueError, match="rank"):
        VariableVideoBatchSampler(rows, bucket, FI, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="missing: width"):
        VariableVideoBatchSampler(pl.DataFrame({"num_frames": [1], "height": [1]}), bucket, FI)
    empty = VariableVideoBatchSampler([{"num_frames": 2, "height": 2, "width": 2}], bucket, FI)
    assert len(empty) == 0 and list(empty) == []


def test_works_as_dataloader_batch_sampler():
    import torch

    class Echo(torch.utils.data.Dataset):
        def __getitem__(self, index: SampleIndex):
            return torch.tensor(index)

        def __len__(self):
            return 60

    rows = _table(60)
    sampler = VariableVideoBatchSampler(rows, Bucket(CONFIG), FI, seed=3)
    loader = torch.utils.data.DataLoader(Echo(), batch_sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert batches == [[list(item) for item in batch] for batch in sampler]
