"""The tokenizer's sample of the train split: bounded, seeded, independent of reading order."""

from __future__ import annotations

import random

import pytest

from moelab.data.corpus import key_hash
from moelab.data.sample import TokenizerSample
from moelab.errors import MoelabError

DOCS = [(f"shard-{i // 50}.jsonl.zst:{i % 50}", random.Random(i).randint(1, 400))
        for i in range(300)]


def brute_force_sample(docs, max_bytes: int, seed: int) -> set[str]:
    """The longest prefix of the documents ranked by seeded key hash whose sizes fit."""
    ranked = sorted(docs, key=lambda d: key_hash(d[0], f"{seed}\0"))
    kept, total = set(), 0
    for key, size in ranked:
        if total + size > max_bytes:
            break
        kept.add(key)
        total += size
    return kept


def offered(docs, max_bytes: int, seed: int = 1) -> TokenizerSample:
    sample = TokenizerSample(max_bytes, seed)
    for key, size in docs:
        sample.offer(key, size)
    return sample


@pytest.mark.parametrize("max_bytes", [1_000, 9_999, 30_000])
def test_the_sample_is_the_hash_ranked_prefix_that_fits_the_budget(max_bytes):
    sample = offered(DOCS, max_bytes)
    kept = {key for key, _ in DOCS if sample.keeps(key)}
    assert kept == brute_force_sample(DOCS, max_bytes, seed=1)
    sizes = dict(DOCS)
    assert sample.kept_bytes == sum(sizes[k] for k in kept) <= max_bytes
    assert sample.kept_documents == len(kept)


def test_reading_order_does_not_change_the_sample():
    shuffled = DOCS[:]
    random.Random(5).shuffle(shuffled)
    first, second = offered(DOCS, 9_999), offered(shuffled, 9_999)
    assert [first.keeps(k) for k, _ in DOCS] == [second.keeps(k) for k, _ in DOCS]


def test_the_seed_chooses_another_sample_of_the_same_budget():
    one, two = offered(DOCS, 9_999, seed=1), offered(DOCS, 9_999, seed=2)
    kept = [{k for k, _ in DOCS if s.keeps(k)} for s in (one, two)]
    assert kept[0] != kept[1]
    assert kept[1] == brute_force_sample(DOCS, 9_999, seed=2)


def test_a_split_that_fits_is_kept_whole():
    total = sum(size for _, size in DOCS)
    sample = offered(DOCS, total)
    assert all(sample.keeps(k) for k, _ in DOCS) and sample.kept_bytes == total
    assert sample.summary()["train_bytes"] == total


def test_a_budget_below_the_first_document_is_an_error_that_says_so():
    sample = offered(DOCS, 1)
    with pytest.raises(MoelabError, match="--spm-sample-bytes 1 is smaller"):
        sample.check()
