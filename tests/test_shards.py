"""Sharded corpora: every format, dotted fields, globs and keys, the missing extra, bad input."""

from __future__ import annotations

import gzip
import json
import lzma
import random
import re
import sys

import pytest
import zstandard
from shard_files import FORMATS, write_shard

from moelab.data.corpus import RecordFields
from moelab.data.shards import expand_shards, open_data
from moelab.errors import MoelabError

RECORDS = [{"text": f"document {i}\nwith two lines", "meta": {"pile_set_name": f"d{i % 3}"},
            "uid": f"u{i}"} for i in range(20)]
PILE = RecordFields(domain="meta.pile_set_name")


def read(data, fields=PILE, **kwargs):
    corpus = open_data(data, fields, **kwargs)
    return corpus, list(corpus)


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_format_reads_every_record_with_its_domain_and_key(tmp_path, suffix):
    shard = write_shard(tmp_path / f"part-00{suffix}", RECORDS)
    _, docs = read(f"{tmp_path}/part-*")  # a glob: one plain .jsonl alone keeps its old reader
    assert [(d.text, d.domain) for d in docs] == [
        (r["text"], r["meta"]["pile_set_name"]) for r in RECORDS]
    assert [d.key for d in docs] == [f"part-00{suffix}:{i}" for i in range(1, 21)]
    unit = "row" if suffix == ".parquet" else "line"
    assert docs[4].where == f"{shard} {unit} 5"


def test_zstd_shard_of_several_frames_is_read_to_the_end(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in RECORDS[i : i + 5]).encode()) for i in (0, 5, 10)]
    (tmp_path / "multi.jsonl.zst").write_bytes(b"".join(frames))
    _, docs = read([str(tmp_path / "multi.jsonl.zst")])
    assert [d.text for d in docs] == [r["text"] for r in RECORDS[:15]]


def test_lines_that_cross_decompressed_blocks_are_whole_records(tmp_path, monkeypatch):
    monkeypatch.setattr("moelab.data.shards.READ_BYTES", 64)
    rng = random.Random(0)  # random letters: zstd emits blocks of at most 128 KiB of lines
    records = [{"text": "".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(1, 9000))),
                "meta": {"pile_set_name": "d"}} for _ in range(120)]
    shard = write_shard(tmp_path / "long.jsonl.zst", records)
    _, docs = read([str(shard)])
    assert [d.text for d in docs] == [r["text"] for r in records if r["text"].strip()]


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".parquet"])
def test_dotted_fields_reach_nested_values_and_a_literal_dotted_key_wins(tmp_path, suffix):
    records = [{"body": {"text": f"nested {i}"}, "meta.pile_set_name": "literal",
                "meta": {"pile_set_name": "nested"}, "uid": f"u{i}"} for i in range(4)]
    shard = write_shard(tmp_path / f"s{suffix}", records)
    fields = RecordFields(text="body.text", domain="meta.pile_set_name", id="uid")
    _, docs = read([str(shard)], fields)
    assert [(d.text, d.domain, d.key) for d in docs] == [
        (f"nested {i}", "literal", f"u{i}") for i in range(4)]


def test_globs_and_lists_give_each_shard_once_keyed_from_the_patterns_folder(tmp_path):
    for name in ("a/00.jsonl.gz", "a/01.jsonl.gz", "b/sub/02.jsonl.xz"):
        write_shard(tmp_path / "pile" / name, RECORDS[:2])
    shards = expand_shards([f"{tmp_path}/pile/**/*.jsonl.*", str(tmp_path / "pile/a/00.jsonl.gz")])
    assert [s.name for s in shards] == ["a/00.jsonl.gz", "a/01.jsonl.gz", "b/sub/02.jsonl.xz"]
    assert [s.size for s in shards] == [(tmp_path / "pile" / n).stat().st_size for n in (
        "a/00.jsonl.gz", "a/01.jsonl.gz", "b/sub/02.jsonl.xz")]
    corpus, docs = read(f"{tmp_path}/pile/**/*.jsonl.*")
    assert docs[2].key == "a/01.jsonl.gz:1"
    assert [f["documents"] for f in corpus.files] == [2, 2, 2]


def test_a_documents_key_does_not_depend_on_the_other_shards(tmp_path):
    for name in ("00", "01", "02"):
        write_shard(tmp_path / f"{name}.jsonl", RECORDS[:3])
    alone = read(f"{tmp_path}/01.*")[1]
    together = read(f"{tmp_path}/*.jsonl")[1]
    assert [d.key for d in alone] == [d.key for d in together[3:6]]


def test_one_folder_or_plain_jsonl_keeps_its_reader_and_split(tmp_path):
    write_shard(tmp_path / "one.jsonl", [{"text": "a", "domain": "x", "id": "7"}])
    corpus, docs = read(str(tmp_path / "one.jsonl"), RecordFields())
    assert not corpus.hashed_split and docs[0].key == "x/7"
    corpus = open_data(f"{tmp_path}/*.jsonl")
    assert corpus.hashed_split


@pytest.mark.parametrize(("module", "suffix"), [("zstandard", ".jsonl.zst"),
                                                ("pyarrow", ".parquet")])
def test_a_missing_extra_is_named_with_its_install_command(tmp_path, monkeypatch, module, suffix):
    shard = write_shard(tmp_path / f"s{suffix}", RECORDS)
    for name in [n for n in sys.modules if n.split(".")[0] == module]:
        monkeypatch.setitem(sys.modules, name, None)  # None: importing it raises ImportError
    with pytest.raises(MoelabError, match=rf"{shard} needs the {module} package.*"
                                          r"pip install 'moelab\[corpora\]'"):
        read([str(shard)])


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _corrupted(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


BIG = [{"text": f"record {i} " + "x" * (i % 50), "meta": {"pile_set_name": "d"}}
       for i in range(3000)]


@pytest.mark.parametrize(("suffix", "damage"), [
    (".jsonl.gz", _truncated), (".jsonl.gz", _corrupted), (".jsonl.xz", _truncated),
    (".jsonl.xz", _corrupted), (".jsonl.zst", _truncated), (".jsonl.zst", _corrupted),
    (".parquet", _truncated)])
def test_a_damaged_shard_is_named_and_skip_keeps_the_lines_before(tmp_path, suffix, damage):
    shard = write_shard(tmp_path / f"bad{suffix}", BIG)
    damage(shard)
    # a corrupted gzip member may first decode to a garbled line: then that line is named
    with pytest.raises(MoelabError, match=rf"{shard} (is damaged after|cannot be read|line \d+ "
                                          r"is not).*--skip-bad-lines"):
        read([str(shard)])
    corpus, docs = read([str(shard)], skip_bad_lines=True)
    assert len(docs) < len(BIG)
    if (suffix, damage) != (".jsonl.gz", _corrupted):  # gzip finds that one at its CRC only
        assert [d.text for d in docs] == [r["text"] for r in BIG[: len(docs)]]
    [damaged] = corpus.skipped.damaged
    assert damaged["path"] == str(shard)
    assert re.match(r"is damaged after (line|row) \d+|cannot be read", damaged["reason"])


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "x", "meta": {"pile', r"line 2 is not valid JSON"),
    ('{"text": "x", "meta": {}}', r'line 2 has no "meta.pile_set_name" domain field .*'
                                  r"--domain-field"),
    ('{"body": "x", "meta": {"pile_set_name": "d"}}', r'line 2 has no "text" text field '
                                                      r"\(its fields: body, meta\).*--text-field"),
    ('{"text": 5, "meta": {"pile_set_name": "d"}}', r'line 2 has a number in its "text"'),
    ('["text"]', r"line 2 is a JSON array"),
])
def test_a_bad_line_is_named_with_file_and_line_or_counted_and_listed(tmp_path, line, message):
    good = json.dumps({"text": "fine", "meta": {"pile_set_name": "d"}})
    shard = _lines(tmp_path / "s.jsonl.gz", [good, line, good])
    shard.write_bytes(gzip.compress(shard.read_bytes()))
    with pytest.raises(MoelabError, match=rf"{shard} {message}.*--skip-bad-lines"):
        read([str(shard)])
    corpus, docs = read([str(shard)], skip_bad_lines=True)
    assert [d.key for d in docs] == ["s.jsonl.gz:1", "s.jsonl.gz:3"]
    assert corpus.skipped.bad_records == 1
    assert [line["where"] for line in corpus.skipped.lines] == [f"{shard} line 2"]
    # the reason is the error's own, without the place the "where" gives
    assert re.search(message.removeprefix("line 2 "), corpus.skipped.lines[0]["reason"])
    assert sum(corpus.skipped.reasons.values()) == 1


def test_only_the_first_bad_lines_are_listed_but_all_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr("moelab.data.corpus.LISTED_BAD_LINES", 3)
    shard = _lines(tmp_path / "s.jsonl.xz", ["not json"] * 10 + ['{"text": "ok"}'])
    shard.write_bytes(lzma.compress(shard.read_bytes()))
    corpus, docs = read([str(shard)], RecordFields(), skip_bad_lines=True)
    assert len(docs) == 1 and corpus.skipped.bad_records == 10 and len(corpus.skipped.lines) == 3


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: [f"{p}/*.jsonl.zst"], r"matches no file"),
    (lambda p: [str(p / "notes.txt"), str(p / "a.jsonl")], r"notes.txt is not a shard"),
    (lambda p: [str(p), str(p / "a.jsonl")], r"is a folder.*give a glob"),
    (lambda p: [str(p / "a.jsonl"), str(p / "sub/a.jsonl")], r"would key their documents alike"),
    (lambda p: [str(p / "missing.jsonl.gz")], r"missing.jsonl.gz does not exist"),
])
def test_inputs_that_cannot_be_shards_say_what_to_do(tmp_path, make, message):
    (tmp_path / "notes.txt").write_text("hello")
    write_shard(tmp_path / "a.jsonl", RECORDS[:1])
    write_shard(tmp_path / "sub" / "a.jsonl", RECORDS[:1])
    with pytest.raises(MoelabError, match=message):
        open_data(make(tmp_path))


def test_shards_of_one_name_read_when_documents_are_keyed_by_id(tmp_path):
    """The refusal above says to key documents with --id-field; with it, names may repeat."""
    write_shard(tmp_path / "a" / "x.jsonl", RECORDS)
    write_shard(tmp_path / "b" / "x.jsonl", [{**r, "uid": "b" + r["uid"]} for r in RECORDS])
    paths = [str(tmp_path / "a" / "x.jsonl"), str(tmp_path / "b" / "x.jsonl")]
    with pytest.raises(MoelabError, match="would key their documents alike"):
        open_data(paths, PILE)
    _, docs = read(paths, RecordFields(domain="meta.pile_set_name", id="uid"))
    assert sorted(d.key for d in docs) == sorted([r["uid"] for r in RECORDS]
                                                 + ["b" + r["uid"] for r in RECORDS])


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   FileNotFoundError(2, "No such file or directory")])
def test_a_shard_that_cannot_be_opened_is_not_taken_for_a_damaged_one(tmp_path, monkeypatch,
                                                                      error):
    """--skip-bad-lines keeps what a damaged shard holds before the damage; a shard moelab may
    not read is not damaged, and skipping it would drop it silently."""
    shard = write_shard(tmp_path / "a.jsonl.gz", RECORDS)

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr("moelab.data.shards.gzip.open", refuse)
    for skip in (False, True):
        with pytest.raises(MoelabError, match=rf"{shard} cannot be read \({error.strerror}\); "
                                              "make it readable"):
            read([f"{tmp_path}/*.jsonl.gz"], skip_bad_lines=skip)


def test_record_fields_are_refused_for_a_folder_corpus(tmp_path):
    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "a.txt").write_text("text")
    with pytest.raises(MoelabError, match="--text-field, --domain-field and --id-field"):
        open_data(str(tmp_path), PILE)
