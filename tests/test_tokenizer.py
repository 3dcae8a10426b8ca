"""The tokenizer is lossless and its vocabulary errors say what works."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelab.data.tokenizer import Tokenizer, train_tokenizer
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
