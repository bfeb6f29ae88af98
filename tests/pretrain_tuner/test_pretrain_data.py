"""The meta-training batch stream: the batch of step t on rank r depends on (seed, t, r) only."""

from __future__ import annotations

from itertools import islice

import pytest

from pretrain_tuner.data import StepBatches


def stream(n: int, **kwargs) -> StepBatches:
    return StepBatches([[f"b{i}"] for i in range(n)], seed=kwargs.pop("seed", 0), **kwargs)


def take(s: StepBatches, k: int) -> list[str]:
    return [b[0] for b in islice(iter(s), k)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_epoch_visits_every_batch_once(shuffle):
    s = stream(7, shuffle=shuffle)
    first, second = take(s, 14)[:7], take(s, 14)[7:]
    assert sorted(first) == sorted(second) == sorted(f"b{i}" for i in range(7))
    if shuffle:
        assert first != second  # a new order each epoch
    else:
        assert first == second == [f"b{i}" for i in range(7)]


def test_starting_at_step_k_continues_the_stream():
    whole = take(stream(5, shuffle=True), 12)
    for k in (0, 3, 5, 9):
        assert take(stream(5, shuffle=True, start=lambda k=k: k), 12 - k) == whole[k:]
    assert take(stream(5, shuffle=True, seed=1), 12) != whole


def test_ranks_split_each_epoch():
    """Two ranks, 7 batches: 4 steps an epoch; together the ranks see every batch, and the one
    slot past the end wraps to a batch of the epoch (DistributedSampler pads the same way)."""
    ranks = [stream(7, shuffle=True, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == 4
    epoch = [take(s, 4) for s in ranks]
    seen = [b for step in zip(*epoch, strict=True) for b in step]  # step by step, rank by rank
    assert sorted(set(seen)) == sorted(f"b{i}" for i in range(7)) and len(seen) == 8
    assert seen[:7] == take(stream(7, shuffle=True), 7)  # the single-process epoch order


def test_bad_arguments():
    with pytest.raises(ValueError, match="no training batches"):
        StepBatches([], shuffle=True, seed=0)
    with pytest.raises(ValueError, match="rank must be in"):
        stream(3, shuffle=True, rank=2, world=2)
