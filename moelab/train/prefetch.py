"""The next update's batches, collated (and pinned on CUDA) on a thread while this update runs.

The data position stays in TrainState: `BatchPrefetcher.take(state)` returns the batches at the
state's position and advances it exactly as loading them in place would, so checkpoints, resume
and the batch order do not depend on prefetching. A load made ahead for a position that is then
not asked for (a resumed or restored state) is dropped and the right one loaded in place.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from moelab.data import Batch, TrainBatches

Position = tuple[int, int]  # (epoch, batch index within that epoch)


def plan_update(batches: TrainBatches, epoch: int, batch_in_epoch: int, *, update_freq: int,
                max_epoch: int) -> tuple[list[Position], Position]:
    """The positions of the next update's `update_freq` batches, and the position after them.

    Crosses epoch ends; stops early past `max_epoch` (0: no limit), so the list may be short or
    empty at the end of training.
    """
    positions: list[Position] = []
    while len(positions) < update_freq and not (max_epoch and epoch > max_epoch):
        positions.append((epoch, batch_in_epoch))
        batch_in_epoch += 1
        if batch_in_epoch >= batches.batches_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
    return positions, (epoch, batch_in_epoch)


class BatchPrefetcher:
    """Loads update n+1's batches on one background thread while update n computes.

    On CUDA the batches are also pinned, so `Batch.to(device, non_blocking=True)` copies them
    without blocking the host. `enabled=False` loads every batch in place (same batches).
    Use as a context manager: leaving it waits for the thread and drops what it loaded.
    """

    def __init__(self, batches: TrainBatches, *, update_freq: int, max_epoch: int,
                 pin_memory: bool = False, enabled: bool = True):
        self.batches = batches
        self.update_freq, self.max_epoch = update_freq, max_epoch
        self.pin_memory = pin_memory
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="moelab-prefetch")
                      if enabled else None)
        self._ahead: tuple[tuple[Position, ...], Future[list[Batch]]] | None = None

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None

    def load(self, positions: list[Position]) -> list[Batch]:
        out = [self.batches.batch(epoch, index) for epoch, index in positions]
        return [b.pin_memory() for b in out] if self.pin_memory else out

    def take(self, state) -> list[Batch]:
        """The batches at state's (epoch, batch_in_epoch); advances state past them.

        Empty when max_epoch is done. Then starts loading the update after.
        """
        positions, (state.epoch, state.batch_in_epoch) = plan_update(
            self.batches, state.epoch, state.batch_in_epoch, update_freq=self.update_freq,
            max_epoch=self.max_epoch)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == tuple(positions):
            out = ahead[1].result()  # raises here what the thread raised
        else:
            if ahead is not None:
                ahead[1].cancel()
            out = self.load(positions)
        if self._pool is not None:
            following, _ = plan_update(self.batches, state.epoch, state.batch_in_epoch,
                                       update_freq=self.update_freq, max_epoch=self.max_epoch)
            if following:
                self._ahead = tuple(following), self._pool.submit(self.load, following)
        return out
