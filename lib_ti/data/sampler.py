"""Epochs of same-bucket batches, with kohya's repeats and regularization balance."""

from __future__ import annotations

import math
import random
from collections import defaultdict


def epoch_samples(items: list) -> list[int]:
    """Item indices making up one epoch, before shuffling.

    Each training image appears `num_repeats` times. Regularization images (kohya semantics)
    fill exactly as many samples as the training set has: the reg images, each with its own
    repeats, are cycled in order until the count matches. kohya reaches the same balance by
    raising reg repeats one image at a time; its first pass may overshoot by a few samples,
    ours never does. Without training samples reg images are not used at all.
    """
    train = [i for i, it in enumerate(items) if not it.subset.is_reg for _ in range(it.subset.num_repeats)]
    reg_pool = [i for i, it in enumerate(items) if it.subset.is_reg for _ in range(it.subset.num_repeats)]
    reg = [reg_pool[k % len(reg_pool)] for k in range(len(train))] if reg_pool else []
    return train + reg


class BatchSampler:
    """Yields batches (lists of item indices) that never mix buckets, since a batch must stack.

    Deterministic: the order of epoch `n` depends only on (seed, n), so a resumed run or a second
    process with the same seed sees the same batches. Partial batches at the end of a bucket are
    kept (kohya does too): dropping them would starve rare aspect ratios.
    """

    def __init__(self, items: list, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self._by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in epoch_samples(items):
            self._by_bucket[items[i].bucket].append(i)

    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(v) / self.batch_size) for v in self._by_bucket.values())

    steps_per_epoch = batches_per_epoch  # one batch = one forward; the loop divides by accumulation

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def samples_per_epoch(self) -> int:
        return sum(len(v) for v in self._by_bucket.values())

    def epoch(self, n: int = 0) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + n)
        batches = []
        for bucket in sorted(self._by_bucket):  # sorted: dict order must not leak into the result
            pool = list(self._by_bucket[bucket])
            rng.shuffle(pool)
            batches += [pool[k:k + self.batch_size] for k in range(0, len(pool), self.batch_size)]
        rng.shuffle(batches)
        return batches
