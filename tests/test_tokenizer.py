"""The tokenizer is lossless and its vocabulary errors say what works."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelab.data import tokenizer as tokenizer_module
from moelab.data.tokenizer import Tokenizer, sampled_lines, train_tokenizer
from moelab.errors import MoelabError

TRAIN_TEXT = [
    "def f(x):\n    return x + 1\n\n\tif x:\n\t\tpass\n",
    "In the beginning God created the heaven and the earth.\n",
    "  leading spaces,   runs of spaces, trailing space \n\n\n",
] * 50


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(train_tokenizer(TRAIN_TEXT, 400))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300))
def test_round_trip_is_lossless_for_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_whitespace_and_newlines_survive(tokenizer):
    for text in ["\n", "\n\n  x\n", "    indented\n\tTab", " leading", "trailing  ", "\r\n"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_too_large_vocabulary_names_the_largest_that_works():
    with pytest.raises(MoelabError, match=r"largest .* is (\d+)") as info:
        train_tokenizer(TRAIN_TEXT, 50257)
    largest = int(re.search(r"is (\d+)", str(info.value)).group(1))
    assert Tokenizer(train_tokenizer(TRAIN_TEXT, largest)).vocab_size == largest


def test_too_small_vocabulary_names_the_smallest_that_works():
    with pytest.raises(MoelabError, match=r"at least (\d+)") as info:
        train_tokenizer(TRAIN_TEXT, 100)
    smallest = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    assert Tokenizer(train_tokenizer(TRAIN_TEXT, smallest)).vocab_size == smallest


def test_special_ids_are_not_text(tokenizer):
    ids = tokenizer.encode("abc")
    assert tokenizer.decode([tokenizer.sp.eos_id(), *ids, 3, tokenizer.vocab_size + 2]) == "abc"


def test_a_corpus_under_the_line_cap_is_learnt_whole_and_in_order():
    lines = [f"line {i}" for i in range(50)]
    assert sampled_lines(iter(lines), 50, seed=1) == lines
    assert sampled_lines(iter(lines), 80, seed=3) == lines


def test_the_line_sample_is_uniform_and_a_function_of_the_seed(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "SAMPLE_BLOCK", 7)  # many blocks of random draws
    lines = [str(i) for i in range(1000)]
    sample = sampled_lines(iter(lines), 100, seed=1)
    assert len(sample) == len(set(sample)) == 100 and set(sample) <= set(lines)
    assert sample == sampled_lines(iter(lines), 100, seed=1)
    assert set(sample) != set(sampled_lines(iter(lines), 100, seed=2))
    # every line is kept with probability 100/1000, early or late in the stream
    counts = np.zeros(1000)
    for seed in range(300):
        counts[[int(x) for x in sampled_lines(iter(lines), 100, seed=seed)]] += 1
    for part in np.split(counts / 300, 5):  # 200 lines each: 6000 draws at p = 0.1
        assert abs(part.mean() - 0.1) < 0.01
    # and exactly: one line kept of three is each of them a third of the time
    kept = [sampled_lines(iter("abc"), 1, seed=seed)[0] for seed in range(900)]
    assert all(abs(kept.count(line) - 300) < 60 for line in "abc"), kept


def test_a_sampled_tokenizer_is_the_same_in_every_process(tmp_path):
    """Above MAX_TRAIN_LINES lines SentencePiece used to sample them itself, seeded anew in every
    process: the same corpus and --seed gave another vocabulary on each run."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), rng.integers(2, 9))) for _ in range(3000)]
    text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(4000))
    (tmp_path / "corpus.txt").write_text(text)
    code = ("import hashlib, sys\nimport moelab.data.tokenizer as t\nt.MAX_TRAIN_LINES = 1000\n"
            "text = open(sys.argv[1]).read()\n"
            "print(hashlib.sha256(t.train_tokenizer([text], 600, seed=int(sys.argv[2])))"
            ".hexdigest())\n")
    def model(seed: int) -> str:
        return subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus.txt"),
                               str(seed)], capture_output=True, text=True, check=True).stdout
    assert model(1) == model(1) == model(1)
    assert model(1) != model(2)
