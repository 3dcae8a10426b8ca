"""`moelab preprocess`: the binarized output, its bad inputs, and fairseq's command line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from moelab.cli import main
from moelab.data import BinarizedDataset, PreprocessConfig, preprocess
from moelab.errors import MoelabError


def test_meta_lists_domains_vocab_and_split_counts(tiny_bin):
    meta = json.loads((tiny_bin / "meta.json").read_text())
    assert meta["domains"] == ["alpha", "beta", "gamma"]
    assert meta["vocab_size"] == 512
    for split in ("train", "valid", "test"):
        ds = BinarizedDataset(tiny_bin, split)
        assert meta["splits"][split]["documents"] == len(ds) > 0
        assert meta["splits"][split]["tokens"] == int(ds.offsets[-1])


def test_every_document_round_trips_through_the_data_bin(tiny_corpus, tiny_bin):
    originals = {f"{p.parent.name}/{p.name}": p.read_text() for p in tiny_corpus.rglob("*.txt")}
    seen = 0
    for split in ("train", "valid", "test"):
        ds = BinarizedDataset(tiny_bin, split)
        tokenizer = ds.tokenizer()
        keys = [json.loads(line)["key"] for line in (tiny_bin / f"{split}.docs.jsonl").open()]
        for i, key in enumerate(keys):
            assert ds.document(i)[-1] == ds.eos_id
            assert tokenizer.decode(ds.document(i)) == originals[key]
            assert ds.domains[ds.domain_ids[i]] == key.split("/")[0]
            seen += 1
    assert seen == len(originals)


def test_splits_do_not_overlap_and_are_deterministic(tiny_corpus, tiny_bin, tmp_path):
    again = tmp_path / "again"
    preprocess(PreprocessConfig(destdir=str(again), data=str(tiny_corpus), vocab_size=512,
                                valid_fraction=0.15, test_fraction=0.15))
    keys = {}
    for split in ("train", "valid", "test"):
        first = (tiny_bin / f"{split}.docs.jsonl").read_text()
        assert first == (again / f"{split}.docs.jsonl").read_text()
        assert (tiny_bin / f"{split}.tokens.bin").read_bytes() == (
            again / f"{split}.tokens.bin").read_bytes()
        keys[split] = {json.loads(line)["key"] for line in first.splitlines()}
    assert not keys["train"] & keys["valid"] and not keys["train"] & keys["test"]


def test_existing_destdir_is_refused_and_force_keeps_other_files(tiny_corpus, tmp_path):
    dest = tmp_path / "bin"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    config = dict(destdir=str(dest), data=str(tiny_corpus), vocab_size=512)
    with pytest.raises(MoelabError, match="already exists.*--force"):
        preprocess(PreprocessConfig(**config))
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]
    preprocess(PreprocessConfig(**config, force=True))
    assert (dest / "notes.txt").read_text() == "mine"
    assert (dest / "meta.json").is_file()
    assert not [p for p in dest.iterdir() if p.name.startswith(".moelab-staging")]


def test_failed_run_leaves_destdir_untouched(tmp_path):
    (tmp_path / "c" / "d").mkdir(parents=True)
    (tmp_path / "c" / "d" / "a.txt").write_text("tiny text " * 20)
    with pytest.raises(MoelabError, match="larger than this corpus supports"):
        preprocess(PreprocessConfig(destdir=str(tmp_path / "bin"), data=str(tmp_path / "c"),
                                    vocab_size=50257))
    assert not (tmp_path / "bin").exists() or not any((tmp_path / "bin").iterdir())


def test_meta_json_is_moved_into_place_last(tiny_corpus, tmp_path, monkeypatch):
    """meta.json marks a data-bin complete: a kill between two renames must not leave it."""
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    preprocess(PreprocessConfig(destdir=str(tmp_path / "bin"), data=str(tiny_corpus),
                                vocab_size=512))
    assert len(moved) > 5 and moved[-1] == "meta.json"


def test_nwordssrc_too_large_reports_a_value_that_works(tmp_path, tiny_corpus):
    with pytest.raises(MoelabError, match=r"largest .* is (\d+)") as info:
        preprocess(PreprocessConfig(destdir=str(tmp_path / "a"), data=str(tiny_corpus),
                                    vocab_size=50257))
    largest = int(re.search(r"is (\d+)", str(info.value)).group(1))
    meta = preprocess(PreprocessConfig(destdir=str(tmp_path / "b"), data=str(tiny_corpus),
                                       vocab_size=largest))
    assert meta["vocab_size"] == largest


def test_non_utf8_files_are_skipped_and_recorded(tmp_path):
    (tmp_path / "c" / "d").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "c" / "d" / f"{i}.txt").write_text(f"document number {i} " * 30)
    (tmp_path / "c" / "d" / "bad.txt").write_bytes(b"\xff\xfe bad bytes")
    with pytest.warns(UserWarning, match="skipped 1 file"):
        meta = preprocess(PreprocessConfig(destdir=str(tmp_path / "bin"), data=str(tmp_path / "c"),
                                           vocab_size=300, valid_fraction=0.2, test_fraction=0.2))
    assert len(meta["skipped_files"]) == 1 and "bad.txt" in meta["skipped_files"][0]
    assert sum(s["documents"] for s in meta["splits"].values()) == 5


def test_long_document_is_chunked_never_dropped(tmp_path):
    (tmp_path / "c" / "d").mkdir(parents=True)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda"]
    long_line = " ".join(words[(i * 7) % 9] + words[i % 5] for i in range(20000))  # one line
    (tmp_path / "c" / "d" / "long.txt").write_text(long_line)
    (tmp_path / "c" / "d" / "short.txt").write_text("a short one\n" * 40)
    preprocess(PreprocessConfig(destdir=str(tmp_path / "bin"), data=str(tmp_path / "c"),
                                vocab_size=400, valid_fraction=0, test_fraction=0))
    ds = BinarizedDataset(tmp_path / "bin", "train")
    long_doc = max(range(len(ds)), key=ds.document_length)
    assert ds.tokenizer().decode(ds.document(long_doc)) == long_line
    chunks = [c for c in ds.chunks(512) if c.doc == long_doc]
    assert len(chunks) > 10
    assert np.array_equal(np.concatenate([ds.chunk_tokens(c) for c in chunks]),
                          ds.document(long_doc))


def test_missing_split_file_and_absent_split(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("one document here\n\nanother document\n" * 30)
    with pytest.raises(MoelabError, match="valid.txt does not exist"):
        preprocess(PreprocessConfig(destdir=str(tmp_path / "a"), trainpref=str(train),
                                    validpref=str(tmp_path / "valid.txt"), vocab_size=300))
    preprocess(PreprocessConfig(destdir=str(tmp_path / "b"), trainpref=str(train), vocab_size=300))
    with pytest.raises(MoelabError, match="no 'valid' split"):
        BinarizedDataset(tmp_path / "b", "valid")


def test_truncated_token_array_is_detected(tiny_bin, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bin, copy)
    tokens = copy / "valid.tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(MoelabError, match="valid.tokens.bin holds .* tokens but meta.json says"):
        BinarizedDataset(copy, "valid")


def _write_txt_splits(folder, tiny_corpus):
    docs = sorted(tiny_corpus.rglob("*.txt"))
    texts = [p.read_text().replace("\n\n", "\n") for p in docs]
    folder.mkdir()
    (folder / "train.txt").write_text("\n\n".join(texts[:-20]) + "\n")
    (folder / "valid.txt").write_text("\n\n".join(texts[-20:-10]) + "\n")
    (folder / "test.txt").write_text("\n\n".join(texts[-10:]) + "\n")
    return len(texts)


def test_seed_preprocess_command_runs_verbatim(tmp_path, tiny_corpus, capsys):
    text = tmp_path / "mix"
    n_docs = _write_txt_splits(text, tiny_corpus)
    argv = (f"preprocess --only-source --trainpref {text}/train.txt --validpref {text}/valid.txt "
            f"--testpref {text}/test.txt --destdir {tmp_path}/data-bin/mix --bpe sentencepiece "
            "--nwordssrc 600 --workers 2").split()
    assert main(argv) == 0
    meta = json.loads((tmp_path / "data-bin/mix/meta.json").read_text())
    assert meta["domains"] == ["unknown"] and meta["vocab_size"] == 600
    assert sum(s["documents"] for s in meta["splits"].values()) == n_docs
    assert meta["splits"]["valid"]["documents"] == 10


def test_workers_do_not_change_the_output(tmp_path, tiny_corpus):
    outputs = []
    for workers in (1, 2):
        dest = tmp_path / f"w{workers}"
        preprocess(PreprocessConfig(destdir=str(dest), data=str(tiny_corpus), vocab_size=512,
                                    workers=workers))
        outputs.append([(dest / f"{s}.tokens.bin").read_bytes() for s in ("train", "valid")])
    assert outputs[0] == outputs[1]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["preprocess", "--trainpref", str(empty), "--destdir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "empty.txt is empty" in err and "Traceback" not in err


def test_bundled_and_data_are_exclusive(tmp_path):
    with pytest.raises(MoelabError, match="exactly one input"):
        PreprocessConfig(destdir=str(tmp_path), bundled=True, data="x")
