"""Chunks, contexts and token-bounded batches."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from moelab.data import (
    BinarizedDataset,
    Chunk,
    Chunks,
    TrainBatches,
    batch_by_size,
    batch_chunks_by_size,
    batching,
)


@pytest.fixture(scope="module")
def train(tiny_bin) -> BinarizedDataset:
    return BinarizedDataset(tiny_bin, "train")


def test_chunks_tile_each_document_without_crossing(train):
    chunks = train.chunks(100)
    for doc in range(len(train)):
        mine = [c for c in chunks if c.doc == doc]
        assert mine[0].start == 0 and mine[-1].end == train.document_length(doc)
        assert all(a.end == b.start for a, b in itertools.pairwise(mine))
        assert all(0 < c.end - c.start <= 100 for c in mine)


@pytest.mark.parametrize("T", [1, 7, 64, 10_000])
def test_chunks_are_what_a_loop_over_documents_makes(train, T):
    """The numbering batching relies on: documents in order, each from its start."""
    expected = [(doc, start, min(start + T, train.document_length(doc)))
                for doc in range(len(train)) for start in range(0, train.document_length(doc), T)]
    chunks = train.chunks(T)
    assert len(chunks) == len(expected)
    assert [tuple(c) for c in chunks] == expected
    assert chunks.lengths.tolist() == [e - s for _, s, e in expected]
    assert tuple(chunks[5]) == expected[5] and chunks[np.int64(2)].end == expected[2][2]
    assert tuple(chunks[-1]) == expected[-1]
    assert chunks[3:9] == [Chunk(*e) for e in expected[3:9]]  # a list, as before
    assert [tuple(c) for c in chunks[np.array([4, 0])]] == [expected[4], expected[0]]
    short, short_lengths = chunks.short()
    assert [(int(i), int(n)) for i, n in zip(short, short_lengths, strict=True)] == [
        (i, e - s) for i, (_, s, e) in enumerate(expected) if e - s < T]
    with pytest.raises(IndexError):
        chunks[len(expected)]


def test_chunks_hold_one_number_per_document_not_per_chunk(train):
    """A billion tokens make millions of chunks: nothing in ``Chunks`` may grow with them."""
    few, many = train.chunks(10_000), train.chunks(1)
    assert len(many) == int(train.offsets[-1]) > 100 * len(few)
    def held(chunks):
        return sum(v.nbytes for v in vars(chunks).values() if isinstance(v, np.ndarray))
    assert held(many) == held(few) <= 16 * (len(train) + 1)


def test_context_is_the_text_just_before_the_chunk(train):
    chunk = next(c for c in train.chunks(64) if c.start >= 128)
    doc = train.document(chunk.doc)
    assert np.array_equal(train.context(chunk, 1000), doc[: chunk.start])
    assert np.array_equal(train.context(chunk, 50), doc[chunk.start - 50 : chunk.start])
    first = train.chunks(64)[0]
    assert len(train.context(first, 1000)) == 0


def test_batches_respect_max_tokens_and_keep_padding_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 257, size=2000)
    batches = batch_by_size(lengths, max_tokens=1024)
    assert sorted(np.concatenate(batches).tolist()) == list(range(2000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert all(len(b) * lengths[b].max() <= 1024 for b in batches)
    assert padded / lengths.sum() < 1.1  # grouping by length: under 10% padding


def greedy_batches(lengths, max_tokens, max_sentences=None, shuffle_seed=None):
    """fairseq's grouping, one index at a time: the reference batch_by_size must match."""
    indices = np.arange(len(lengths))
    if shuffle_seed is not None:
        indices = np.random.default_rng(shuffle_seed).permutation(len(lengths))
    batches, current, longest = [], [], 0
    for index in indices[np.argsort(lengths[indices], kind="stable")]:
        grown = max(longest, int(lengths[index]))
        full = max_sentences is not None and len(current) >= max_sentences
        if current and (grown * (len(current) + 1) > max_tokens or full):
            batches.append(current)
            current, grown = [], int(lengths[index])
        current.append(int(index))
        longest = grown
    return [*batches, current] if current else batches


def test_batches_are_the_greedy_grouping_index_by_index():
    rng = np.random.default_rng(0)
    for trial in range(500):
        T = int(rng.integers(1, 40))
        lengths = rng.integers(1, T + 1, int(rng.integers(0, 80)))
        lengths[rng.random(len(lengths)) < rng.random()] = T  # runs of full chunks
        max_tokens = int(rng.integers(T, 5 * T + 2))
        max_sentences = None if trial % 2 else int(rng.integers(1, 6))
        seed = None if trial % 3 == 0 else [trial, 1]
        plan = batch_by_size(lengths, max_tokens, max_sentences, shuffle_seed=seed)
        assert [b.tolist() for b in plan] == greedy_batches(lengths, max_tokens, max_sentences,
                                                            seed)
        assert len(plan) == len(greedy_batches(lengths, max_tokens, max_sentences))


def test_chunk_batches_are_batch_by_size_over_the_chunk_lengths(monkeypatch):
    """Training plans its epochs from the document lengths alone; the plan must be the one that
    sorting every chunk's length would give (the shuffle, the stable sort, the grouping), so runs
    keep their batches. Small blocks make the partition cross many of them."""
    rng = np.random.default_rng(1)
    for trial in range(400):
        monkeypatch.setattr(batching, "PARTITION_BLOCK", int(rng.integers(1, 12)) if trial % 2
                            else 1 << 18)
        T = int(rng.integers(1, 12))
        documents = rng.integers(1, 4 * T + 2, int(rng.integers(0, 30)))
        documents[rng.random(len(documents)) < rng.random()] = T * int(rng.integers(1, 4))
        chunks = Chunks(documents, T)
        max_tokens = int(rng.integers(T, 5 * T + 2))
        max_sentences = None if trial % 3 else int(rng.integers(1, 6))
        seed = None if trial % 5 == 0 else [trial, 1]
        plan = batch_chunks_by_size(chunks, max_tokens, max_sentences, shuffle_seed=seed)
        expected = batch_by_size(chunks.lengths, max_tokens, max_sentences, shuffle_seed=seed)
        assert np.array_equal(plan.indices, expected.indices), trial
        assert np.array_equal(plan.bounds, expected.bounds), trial
    with pytest.raises(ValueError, match="--max-tokens 3 is smaller than the longest chunk"):
        batch_chunks_by_size(Chunks(np.array([2, 9]), 4), max_tokens=3)


def test_an_epoch_costs_one_index_per_chunk_in_memory(monkeypatch):
    """A billion tokens make millions of chunks: planning an epoch, and the plan itself, may
    take one int32 per chunk, not a table, a lengths array or an argsort over them, and a new
    epoch's plan replaces the last one's rather than joining it."""
    monkeypatch.setattr(batching, "PARTITION_BLOCK", 1 << 14)
    rng = np.random.default_rng(0)
    documents = rng.integers(500, 1500, 4000)  # ~2 M chunks of 1 token, half the ends short
    chunks = Chunks(documents * 2 + rng.integers(0, 2, 4000), 2)

    class Split:  # what TrainBatches reads of a dataset before its first batch
        split = "train"

        def chunks(self, tokens_per_sample):
            return chunks

    tracemalloc.start()
    try:
        batches = TrainBatches(Split(), tokens_per_sample=2, max_tokens=64, seed=1)  # type: ignore[arg-type]
        plan = batches.batches(3)
        del plan
        plan = batches.batches(4)  # the next epoch's plan replaces the last one's
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(plan.indices) == len(chunks) > 1_500_000
    assert peak < 5 * len(chunks), peak / len(chunks)  # bytes per chunk


def test_max_sentences_caps_rows():
    batches = batch_by_size(np.full(50, 4), max_tokens=1000, max_sentences=7)
    assert max(len(b) for b in batches) == 7


def test_chunk_longer_than_max_tokens_is_an_error():
    with pytest.raises(ValueError, match="--max-tokens 10 is smaller than the longest chunk"):
        batch_by_size(np.array([5, 20]), max_tokens=10)


def test_batch_fields_match_the_chunks(train):
    tb = TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=3)
    batch = next(tb.epoch(0))
    assert batch.tokens.shape[0] * batch.tokens.shape[1] <= 512
    for row in range(len(batch)):
        n = int(batch.lengths[row])
        assert (batch.tokens[row, n:] == train.pad_id).all()
        assert int(batch.domain_ids[row]) == train.domain_ids[int(batch.doc_ids[row])]
    assert batch.num_tokens == int(batch.lengths.sum())


def test_epoch_order_is_deterministic_and_resumable(train):
    tb = TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=3)
    assert tb.order(0) == TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=3).order(0)
    assert tb.order(0) != tb.order(1)
    full = list(tb.epoch(2))
    resumed = list(tb.epoch(2, start=5))
    assert len(resumed) == len(full) - 5
    assert all(a.tokens.equal(b.tokens) for a, b in zip(full[5:], resumed, strict=True))


def test_ranks_get_disjoint_equal_shards(train):
    shards = [TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=3, rank=r,
                           world_size=3) for r in range(3)]
    orders = [set(s.order(4)) for s in shards]
    assert len({len(o) for o in orders}) == 1
    assert not (orders[0] & orders[1]) and not (orders[1] & orders[2])


def _single_domain_share(batches: list[np.ndarray], chunk_domains: np.ndarray) -> float:
    return float(np.mean([len(set(chunk_domains[b].tolist())) == 1 for b in batches]))


def test_batches_mix_domains_as_random_batching_does(train):
    """fairseq shuffles the chunks before sorting them by size: a batch of full-length chunks is
    random company, not consecutive chunks of one document or one domain."""
    tb = TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=3)
    domains = np.asarray([train.domain_ids[c.doc] for c in tb.chunks])
    rng = np.random.default_rng(0)
    for epoch in (1, 2):
        batches = tb.batches(epoch)
        observed = _single_domain_share(batches, domains)
        # the same batch sizes filled at random, many times: what random batching gives
        sizes = np.cumsum([len(b) for b in batches])[:-1]
        random_shares = []
        for _ in range(200):
            shuffled = np.split(rng.permutation(len(domains)), sizes)
            random_shares.append(_single_domain_share(shuffled, domains))
        expected, spread = float(np.mean(random_shares)), float(np.std(random_shares))
        assert observed <= expected + 3 * spread + 0.05, (epoch, observed, expected, spread)
        # ... and the batches still group chunks by length, so padding stays small
        lengths = tb.chunks.lengths
        padding = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)
        assert padding <= 0.05 * lengths.sum()


def test_every_epoch_regroups_every_chunk_once_and_replays_exactly(train):
    tb = TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=3)
    again = TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=3)
    for epoch in (1, 2):
        batches = tb.batches(epoch)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(tb.chunks)))
        assert all(np.array_equal(a, b)
                   for a, b in zip(batches, again.batches(epoch), strict=True))
    groups = [{frozenset(b.tolist()) for b in tb.batches(e)} for e in (1, 2)]
    assert groups[0] != groups[1]  # a new epoch is new company, not the same batches reordered
    other_seed = TrainBatches(train, tokens_per_sample=64, max_tokens=512, seed=4)
    assert groups[0] != {frozenset(b.tolist()) for b in other_seed.batches(1)}
