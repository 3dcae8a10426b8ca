"""Batches bounded by a token budget, grouping chunks of similar length as fairseq does.

``max_tokens`` bounds the padded size B x max_len of a batch, so padding stays small and memory
predictable. As in fairseq, each training epoch first shuffles the chunks with a seeded
permutation, then sorts them by length with a stable sort, groups them into batches and shuffles
the batches: chunks of equal length (most of them: every full chunk has tokens-per-sample
tokens) meet in random company. Without the first shuffle a batch would be consecutive chunks of
one document or domain, and the E-step would see single-domain batches. An epoch's batches and
their order are a pure function of (seed, epoch), which is what makes exact resume and identical
shards across DDP ranks possible. Training plans an epoch from the document lengths alone
(``batch_chunks_by_size``): the same plan as sorting every chunk's length, in one int32 per
chunk, so that a corpus of a billion tokens plans its epochs in tens of MB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from moelab.data.dataset import BinarizedDataset, Chunk, Chunks


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) chunk tokens x_1..x_n, right-padded with pad_id
    lengths: torch.Tensor  # (B,) real tokens per row (>= 1)
    context: torch.Tensor  # (B, C) the document's tokens before the chunk, right-padded; C may be 0
    context_lengths: torch.Tensor  # (B,) 0 for a document's first chunk
    doc_ids: torch.Tensor  # (B,) document index within the split
    domain_ids: torch.Tensor  # (B,)

    @property
    def num_tokens(self) -> int:
        """Number of prediction targets in the batch."""
        return int(self.lengths.sum())

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                        for f in fields(self)})

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def _pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out = torch.full((len(rows), int(lengths.max()) if rows else 0), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.from_numpy(row)
    return out, lengths


def collate(ds: BinarizedDataset, chunks: list[Chunk], max_context: int) -> Batch:
    tokens, lengths = _pad([ds.chunk_tokens(c) for c in chunks], ds.pad_id)
    context, context_lengths = _pad([ds.context(c, max_context) for c in chunks], ds.pad_id)
    return Batch(
        tokens=tokens,
        lengths=lengths,
        context=context,
        context_lengths=context_lengths,
        doc_ids=torch.tensor([c.doc for c in chunks], dtype=torch.long),
        domain_ids=torch.tensor([int(ds.domain_ids[c.doc]) for c in chunks], dtype=torch.long),
    )


class BatchPlan(Sequence[np.ndarray]):
    """An epoch's batches: one array of chunk indices, batch after batch, and where each batch
    starts. Read as a sequence of index arrays; a list of small arrays would cost about 100
    bytes of overhead per batch, and a large corpus makes hundreds of thousands of batches."""

    def __init__(self, indices: np.ndarray, bounds: np.ndarray):
        self.indices = indices  # (n,) chunk indices in batch order
        self.bounds = bounds  # (batches + 1,) batch i is indices[bounds[i] : bounds[i + 1]]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        i = int(i) % len(self)
        return self.indices[self.bounds[i] : self.bounds[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.indices[self.bounds[i] : self.bounds[i + 1]]


def _shuffled(n: int, shuffle_seed: list[int] | None) -> np.ndarray:
    """0 .. n-1, shuffled in place by the seed (None: in order). The same order as
    ``default_rng(seed).permutation(n)``, whose Fisher-Yates draws do not depend on the dtype, in
    int32 below 2**31: one index per chunk, rebuilt every epoch."""
    indices = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(indices)
    return indices


def _check_longest(longest: int, max_tokens: int) -> None:
    if longest > max_tokens:
        raise ValueError(
            f"--max-tokens {max_tokens} is smaller than the longest chunk ({longest} tokens); "
            "raise --max-tokens or lower --tokens-per-sample.")


def _batch_bounds(run_lengths: np.ndarray, run_sizes: np.ndarray, max_tokens: int,
                  max_sentences: int | None) -> np.ndarray:
    """Where each batch starts in the sorted order, and where the last ends, given the runs of
    equal length that the order makes (ascending lengths, how many of each).

    Greedy, as fairseq: walking the sorted indices, a batch takes the next one while (rows + 1)
    x its length (the longest so far) stays within max_tokens and rows < max_sentences. The walk
    goes a run at a time (at most tokens-per-sample runs), not an index at a time.
    """
    dtype = np.int32 if int(np.sum(run_sizes)) < 2**31 else np.int64
    starts, position, rows = [np.zeros(1, dtype)], 0, 0  # rows: in the open batch, ending here
    for length, size in zip(run_lengths.tolist(), run_sizes.tolist(), strict=True):
        capacity = max_tokens // max(length, 1)
        if max_sentences is not None:
            capacity = min(capacity, max_sentences)
        capacity = max(capacity, 1)
        if rows >= capacity:  # the open batch cannot take a row this long
            starts.append(np.array([position], dtype))
            rows = 0
        taken = min(size, capacity - rows)  # fill the open batch
        position, rows, size = position + taken, rows + taken, size - taken
        if size:  # then new batches of `capacity` rows, the last one left open
            new = -(-size // capacity)
            starts.append(np.arange(position, position + capacity * new, capacity, dtype=dtype))
            position += size
            rows = size - capacity * (new - 1)
    if rows:
        starts.append(np.array([position], dtype))
    return np.concatenate(starts)


def batch_by_size(
    lengths: np.ndarray, max_tokens: int, max_sentences: int | None = None, *,
    shuffle_seed: list[int] | None = None,
) -> BatchPlan:
    """Group indices (sorted by length) so that rows x longest row <= max_tokens per batch.

    shuffle_seed: permute the indices with this seed before the stable sort by length (fairseq's
    shuffle-then-sort), so equal-length chunks are grouped at random; None keeps index order.
    The number of batches depends on the lengths alone, not on the permutation.
    """
    lengths = np.asarray(lengths)
    _check_longest(int(lengths.max(initial=0)), max_tokens)
    indices = _shuffled(len(lengths), shuffle_seed)
    order = indices[np.argsort(lengths[indices], kind="stable")]
    del indices
    run_lengths, run_sizes = np.unique(lengths[order], return_counts=True)
    return BatchPlan(order, _batch_bounds(run_lengths, run_sizes, max_tokens, max_sentences))


def _chunk_runs(chunks: Chunks) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(short chunks' numbers, their lengths, run lengths, run sizes) of ``chunks`` sorted by
    length: the short chunks' lengths, then every other chunk at tokens-per-sample."""
    short, short_lengths = chunks.short()
    run_lengths, run_sizes = np.unique(short_lengths, return_counts=True)
    full = len(chunks) - len(short)
    if full:
        run_lengths = np.append(run_lengths, chunks.tokens_per_sample)
        run_sizes = np.append(run_sizes, full)
    return short, short_lengths, run_lengths, run_sizes


PARTITION_BLOCK = 1 << 16  # shuffled indices examined at a time while sorting chunks by length


def batch_chunks_by_size(
    chunks: Chunks, max_tokens: int, max_sentences: int | None = None, *,
    shuffle_seed: list[int] | None = None,
) -> BatchPlan:
    """``batch_by_size(chunks.lengths, ...)``, the same plan, in one index per chunk.

    Every chunk is full but some documents' last, so sorting the shuffled chunks stably by length
    is a partition: the short ones (at most one per document), sorted by length, then the full
    ones in shuffled order. The full ones are moved right within the shuffled array itself, a
    block at a time, so the epoch's order costs 4 bytes per chunk and nothing more: no array of
    lengths, no argsort over every chunk.
    """
    short, short_lengths, run_lengths, run_sizes = _chunk_runs(chunks)
    _check_longest(int(run_lengths.max(initial=0)), max_tokens)
    order = _shuffled(len(chunks), shuffle_seed)
    end, short_blocks = len(order), []  # order[end:] holds the full chunks moved so far
    for stop in range(len(order), 0, -PARTITION_BLOCK):
        block = order[max(0, stop - PARTITION_BLOCK) : stop]
        found = np.minimum(np.searchsorted(short, block), max(len(short) - 1, 0))
        is_short = short[found] == block if len(short) else np.zeros(len(block), dtype=bool)
        short_blocks.append(block[is_short])
        full = block[~is_short]
        order[end - len(full) : end] = full  # never past the block's start: moving right
        end -= len(full)
    shuffled_short = np.concatenate(short_blocks[::-1]) if short_blocks else order[:0]
    by_length = np.argsort(short_lengths[np.searchsorted(short, shuffled_short)], kind="stable")
    order[:end] = shuffled_short[by_length]
    return BatchPlan(order, _batch_bounds(run_lengths, run_sizes, max_tokens, max_sentences))


class TrainBatches:
    """Every chunk of a split, batched by size, in a deterministic order per epoch and rank."""

    def __init__(
        self,
        ds: BinarizedDataset,
        *,
        tokens_per_sample: int,
        max_tokens: int,
        seed: int = 1,
        max_sentences: int | None = None,
        max_context: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.ds = ds
        self.tokens_per_sample = tokens_per_sample
        self.chunks = ds.chunks(tokens_per_sample)
        self.max_context = tokens_per_sample if max_context is None else max_context
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        # (epoch, batches, this rank's order): the last epoch's, since every batch looks it up
        self._epoch: tuple[int, BatchPlan, np.ndarray] | None = None
        runs = _chunk_runs(self.chunks)[2:]
        _check_longest(int(runs[0].max(initial=0)), max_tokens)
        num_batches = len(_batch_bounds(*runs, max_tokens, max_sentences)) - 1  # any epoch
        # Every rank takes the same number of batches, so no rank waits on a missing all-reduce.
        self.batches_per_epoch = num_batches // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the {ds.split} split makes {num_batches} batch(es), fewer than the "
                f"{world_size} rank(s); lower --max-tokens or use fewer processes."
            )

    def _plan(self, epoch: int) -> tuple[BatchPlan, np.ndarray]:
        """(every batch of ``epoch`` as chunk indices, the batch indices this rank visits)."""
        cached = self._epoch  # one read: the prefetching thread may replace it meanwhile
        if cached is None or cached[0] != epoch:
            self._epoch = cached = None  # the last epoch's plan goes before the next is made
            # fairseq: shuffle the chunks, sort by size, group, then shuffle the groups
            seed = [self.seed, epoch, 1] if self.shuffle else None
            batches = batch_chunks_by_size(self.chunks, self.max_tokens, self.max_sentences,
                                           shuffle_seed=seed)
            indices = _shuffled(len(batches), [self.seed, epoch] if self.shuffle else None)
            mine = indices[self.rank :: self.world_size][: self.batches_per_epoch]
            cached = self._epoch = epoch, batches, mine
        return cached[1], cached[2]

    def batches(self, epoch: int) -> BatchPlan:
        """Every batch of ``epoch`` (all ranks'), each an array of indices into ``chunks``."""
        return self._plan(epoch)[0]

    def order(self, epoch: int) -> tuple[int, ...]:
        """Indices into ``batches(epoch)`` that this rank visits in ``epoch``, in order."""
        return tuple(int(i) for i in self._plan(epoch)[1])

    def batch_chunks(self, epoch: int, position: int) -> list[Chunk]:
        """The chunks of the batch at ``position`` of this rank's order in ``epoch``."""
        batches, order = self._plan(epoch)
        return self.chunks[batches[order[position]]]

    def batch(self, epoch: int, position: int) -> Batch:
        """The batch at ``position`` of this rank's order in ``epoch``."""
        return collate(self.ds, self.batch_chunks(epoch, position), self.max_context)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for position in range(start, self.batches_per_epoch):
            yield self.batch(epoch, position)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)
