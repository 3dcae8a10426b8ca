"""The prefetching thread hands out exactly the batches, and positions, of loading in place."""

from __future__ import annotations

import pytest
import torch

from moelab.data import BinarizedDataset, TrainBatches
from moelab.train.prefetch import BatchPrefetcher, plan_update
from moelab.train.state import TrainState


@pytest.fixture
def batches(tiny_bin) -> TrainBatches:
    return TrainBatches(BinarizedDataset(tiny_bin, "train"), tokens_per_sample=32,
                        max_tokens=256, seed=3)


def _walk(prefetcher: BatchPrefetcher, state: TrainState) -> list[tuple]:
    seen = []
    while True:
        position = (state.epoch, state.batch_in_epoch)
        update = prefetcher.take(state)
        if not update:
            return seen
        seen.append((position, [b.tokens.clone() for b in update]))


def _in_place(batches: TrainBatches, max_epoch: int) -> list[torch.Tensor]:
    return [b.tokens for epoch in range(1, max_epoch + 1) for b in batches.epoch(epoch)]


def test_prefetched_updates_are_the_in_place_batches_across_epoch_ends(batches):
    expected = _in_place(batches, max_epoch=2)
    assert batches.batches_per_epoch % 5 != 0  # an update straddles the epoch end
    with BatchPrefetcher(batches, update_freq=5, max_epoch=2) as prefetcher:
        walked = _walk(prefetcher, TrainState())
    with BatchPrefetcher(batches, update_freq=5, max_epoch=2, enabled=False) as in_place:
        walked_in_place = _walk(in_place, TrainState())
    got = [t for _, update in walked for t in update]
    assert len(got) == len(expected) == 2 * batches.batches_per_epoch
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert [p for p, _ in walked] == [p for p, _ in walked_in_place]


def test_a_state_moved_elsewhere_gets_its_own_batches(batches):
    """A restore between updates moves the position: what was loaded ahead is dropped."""
    with BatchPrefetcher(batches, update_freq=1, max_epoch=0) as prefetcher:
        prefetcher.take(TrainState())  # starts loading (1, 1)
        state = TrainState(epoch=2, batch_in_epoch=4)
        (got,) = prefetcher.take(state)
    assert torch.equal(got.tokens, batches.batch(2, 4).tokens)
    assert (state.epoch, state.batch_in_epoch) == (2, 5)


def test_plan_stops_after_max_epoch(batches):
    n = batches.batches_per_epoch
    positions, after = plan_update(batches, 1, n - 1, update_freq=4, max_epoch=1)
    assert positions == [(1, n - 1)] and after == (2, 0)
    assert plan_update(batches, 2, 0, update_freq=4, max_epoch=1) == ([], (2, 0))


def test_a_failing_load_raises_in_the_training_thread(batches, monkeypatch):
    def broken(epoch: int, position: int):
        raise OSError("disk gone")

    with BatchPrefetcher(batches, update_freq=1, max_epoch=0) as prefetcher:
        state = TrainState()
        prefetcher.take(state)  # loads (1, 0) in place, (1, 1) ahead
        monkeypatch.setattr(batches, "batch", broken)
        prefetcher.take(state)  # (1, 1) from the thread; (1, 2) fails there
        with pytest.raises(OSError, match="disk gone"):
            prefetcher.take(state)
