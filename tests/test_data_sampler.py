"""Epoch composition (repeats, reg balance), bucket purity and determinism."""

from __future__ import annotations

from collections import Counter

import pytest

from lib_ti.data import BatchSampler, ImageItem, SubsetSpec, epoch_samples

DOG = SubsetSpec("dog", num_repeats=3)
CAT = SubsetSpec("cat", num_repeats=1)
REG = SubsetSpec("reg", num_repeats=1, is_reg=True)


def items():
    out = []
    for n, (sub, bucket) in enumerate([(DOG, (64, 64)), (DOG, (64, 128)), (CAT, (64, 64)), (CAT, (128, 64)),
                                       (CAT, (64, 64)), (REG, (64, 64)), (REG, (64, 128))]):
        out.append(ImageItem(f"{n}.png", bucket, "", sub, bucket, bucket))
    return out


def test_epoch_counts_repeats_and_reg_balance():
    its = items()
    counts = Counter(epoch_samples(its))
    assert [counts[i] for i in range(5)] == [3, 3, 1, 1, 1]
    n_train = 9
    assert counts[5] + counts[6] == n_train  # kohya: as many reg samples as train samples
    assert abs(counts[5] - counts[6]) <= 1  # cycled evenly


def test_reg_with_repeats_cycles_whole_repeat_groups():
    train = [ImageItem("t.png", (64, 64), "", SubsetSpec("t", num_repeats=5), (64, 64), (64, 64))]
    reg = [ImageItem("r.png", (64, 64), "", SubsetSpec("r", num_repeats=2, is_reg=True), (64, 64), (64, 64)),
           ImageItem("s.png", (64, 64), "", SubsetSpec("r", num_repeats=2, is_reg=True), (64, 64), (64, 64))]
    assert epoch_samples(train + reg) == [0] * 5 + [1, 1, 2, 2, 1]
    assert epoch_samples(reg) == []  # reg alone trains nothing


@pytest.mark.parametrize("bs", [1, 2, 3, 5])
def test_batches_are_bucket_pure_and_cover_the_epoch(bs):
    its = items()
    s = BatchSampler(its, bs, seed=1)
    batches = s.epoch(0)
    assert len(batches) == s.batches_per_epoch() == s.steps_per_epoch() == len(s)
    assert all(1 <= len(b) <= bs for b in batches)
    assert all(len({its[i].bucket for i in b}) == 1 for b in batches)
    assert Counter(i for b in batches for i in b) == Counter(epoch_samples(its))
    assert s.samples_per_epoch() == 18


def test_deterministic_per_seed_and_epoch():
    its = items()
    a, b = BatchSampler(its, 2, seed=7), BatchSampler(its, 2, seed=7)
    assert a.epoch(3) == b.epoch(3)
    assert len({str(a.epoch(n)) for n in range(5)}) > 1  # epochs reshuffle
    assert len({str(BatchSampler(its, 2, seed=s).epoch(0)) for s in range(5)}) > 1  # seeds differ


def test_bad_batch_size():
    with pytest.raises(ValueError):
        BatchSampler(items(), 0)
