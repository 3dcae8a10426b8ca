"""Corpus readers and the deterministic split."""

from __future__ import annotations

import json

import pytest

from moelab.data.corpus import open_corpus, split_of_keys
from moelab.errors import MoelabError


def test_folder_corpus_reads_one_document_per_file(tmp_path):
    (tmp_path / "news").mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "news" / "a.txt").write_text("Hello\n\nworld\n")
    (tmp_path / "code" / "b.py").write_text("def f():\n    return 1\n")
    docs = list(open_corpus(tmp_path))
    assert [(d.domain, d.text) for d in docs] == [
        ("code", "def f():\n    return 1\n"),
        ("news", "Hello\n\nworld\n"),
    ]


def test_txt_corpus_splits_documents_on_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("first doc line 1\nline 2\n\n\nsecond doc\n  indented\n\nthird")
    docs = list(open_corpus(path))
    assert [d.text for d in docs] == ["first doc line 1\nline 2", "second doc\n  indented", "third"]
    assert {d.domain for d in docs} == {"unknown"}


def test_jsonl_corpus_with_and_without_domain(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [{"text": "a b", "domain": "x"}, {"text": "c d"}, {"text": "   "}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    docs = list(open_corpus(path))
    assert [(d.domain, d.text) for d in docs] == [("x", "a b"), ("unknown", "c d")]


def test_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(MoelabError, match="line 2"):
        list(open_corpus(path))


@pytest.mark.parametrize("make", ["empty_file", "empty_folder", "missing"])
def test_empty_or_missing_input_is_refused(tmp_path, make):
    path = tmp_path / "input"
    if make == "empty_file":
        path.write_text("")
    elif make == "empty_folder":
        path.mkdir()
    with pytest.raises(MoelabError, match="empty|does not exist|no domain"):
        open_corpus(path)


def test_domain_folder_without_files_is_refused(tmp_path):
    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "a.txt").write_text("text")
    (tmp_path / "empty_domain").mkdir()
    with pytest.raises(MoelabError, match="empty_domain has no files"):
        open_corpus(tmp_path)


def test_non_utf8_file_in_folder_is_skipped_and_counted(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "good.txt").write_text("good text")
    (tmp_path / "d" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "d" / "binary.bin").write_bytes(b"\x00\x01\x02")
    corpus = open_corpus(tmp_path)
    docs = list(corpus)
    assert [d.text for d in docs] == ["good text"]
    assert len(corpus.skipped.paths) == 2
    assert any("latin1.txt" in p for p in corpus.skipped.paths)


def test_non_utf8_txt_split_stops_with_the_file_named(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"fine\n\ncaf\xe9\n")
    with pytest.raises(MoelabError, match="train.txt line 3 is not UTF-8"):
        list(open_corpus(path))


def test_split_is_deterministic_proportional_and_order_free():
    keys = {"a": [f"a/{i}" for i in range(100)], "b": [f"b/{i}" for i in range(40)]}
    first = split_of_keys(keys, 0.1, 0.2)
    reordered = split_of_keys({k: list(reversed(v)) for k, v in reversed(keys.items())}, 0.1, 0.2)
    assert first == reordered
    counts = {(k.split("/")[0], s): 0 for k in first for s in ("train", "valid", "test")}
    for key, split in first.items():
        counts[(key.split("/")[0], split)] += 1
    assert counts[("a", "valid")] == 10 and counts[("a", "test")] == 20
    assert counts[("b", "valid")] == 4 and counts[("b", "test")] == 8


def test_bad_fractions_are_refused():
    with pytest.raises(MoelabError, match="sum to less than 1"):
        split_of_keys({"a": ["x"]}, 0.6, 0.5)
