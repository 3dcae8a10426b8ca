"""`moelab preprocess` on sharded corpora: the data-bin, the hashed split, domain selection, the
tokenizer's bounded sample, bad records in meta.json, and a killed run."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from shard_files import pile_records, write_shard

from moelab.cli import main
from moelab.data import BinarizedDataset, PreprocessConfig, preprocess, read_meta
from moelab.data.preprocess import _raw_to_npy
from moelab.errors import MoelabError

preprocess_module = importlib.import_module("moelab.data.preprocess")  # not the function

DOMAINS = ("d0", "d1", "d2")
RECORDS = pile_records(DOMAINS, 40)
SHARDS = {"00.jsonl.zst": RECORDS[:40], "01.parquet": RECORDS[40:80],
          "02.jsonl.gz": RECORDS[80:]}
PILE = dict(domain_field="meta.pile_set_name", vocab_size=300, valid_fraction=0.2,
            test_fraction=0.2)


@pytest.fixture
def shards(tmp_path) -> Path:
    folder = tmp_path / "pile"
    for name, records in SHARDS.items():
        write_shard(folder / name, records)
    return folder


def run(tmp_path, name: str, data, **options) -> dict:
    return preprocess(PreprocessConfig(destdir=str(tmp_path / name), data=data,
                                       **{**PILE, **options}))


def split_keys(data_bin: Path) -> dict[str, list[str]]:
    return {split: [json.loads(line)["key"] for line in
                    (data_bin / f"{split}.docs.jsonl").read_text().splitlines()]
            for split in ("train", "valid", "test")}


def expected_split(key: str, valid: float = 0.2, test: float = 0.2) -> str:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test else "valid" if h < test + valid else "train"


def test_every_shard_document_round_trips_with_its_domain(tmp_path, shards):
    meta = run(tmp_path, "bin", f"{shards}/*")
    texts = {}
    for split in ("train", "valid", "test"):
        ds = BinarizedDataset(tmp_path / "bin", split)
        tokenizer = ds.tokenizer()
        for i in range(len(ds)):
            texts[tokenizer.decode(ds.document(i))] = ds.domains[ds.domain_ids[i]]
    assert texts == {r["text"]: r["meta"]["pile_set_name"] for r in RECORDS}
    assert meta["domains"] == list(DOMAINS)
    assert meta["shards"] == [{"path": str(shards / name), "bytes": (shards / name).stat().st_size,
                               "documents": 40} for name in sorted(SHARDS)]
    assert meta["split_scheme"] == "hash of each document's key"


def test_each_document_splits_by_its_own_key_so_a_new_shard_moves_none(tmp_path, shards):
    run(tmp_path, "two", [str(shards / "00.jsonl.zst"), str(shards / "01.parquet")])
    run(tmp_path, "three", f"{shards}/*")
    before, after = split_keys(tmp_path / "two"), split_keys(tmp_path / "three")
    for split in before:
        assert all(expected_split(key) == split for key in after[split])
        assert set(before[split]) <= set(after[split])
    assert sum(map(len, before.values())) == 80 and sum(map(len, after.values())) == 120


def test_domains_and_the_cap_keep_each_domains_first_documents(tmp_path, shards):
    meta = run(tmp_path, "bin", f"{shards}/*", domains=["d0", "d2"], max_docs_per_domain=10)
    kept = [k for keys in split_keys(tmp_path / "bin").values() for k in keys]
    keys_in_order = [(f"{name}:{i + 1}", r["meta"]["pile_set_name"])
                     for name, records in sorted(SHARDS.items()) for i, r in enumerate(records)]
    first_ten = [k for d in ("d0", "d2") for k in [k for k, dom in keys_in_order if dom == d][:10]]
    assert sorted(kept) == sorted(first_ten)
    assert meta["domains"] == ["d0", "d2"]
    skipped = meta["skipped_documents"]
    assert skipped["by_reason"] == {"domain not in --domains": 40,
                                    "over --max-docs-per-domain": 60}
    assert skipped["left_out_domains"] == {"d1": 40}


def test_a_domain_no_document_has_is_named_with_the_ones_found(tmp_path, shards):
    with pytest.raises(MoelabError, match="--domains names d9, which no document of the input "
                                          "has; its domains are d0, d1, d2"):
        run(tmp_path, "bin", f"{shards}/*", domains=["d0", "d9"])


def test_a_domain_too_small_for_valid_and_test_names_where_it_starts(tmp_path, shards):
    small = [{"text": "lonely words here", "meta": {"pile_set_name": "rare"}}]
    write_shard(shards / "03.jsonl.xz", RECORDS[:2] + small)
    with pytest.raises(MoelabError, match=rf"domain 'rare' \(first document: {shards}/03.jsonl.xz "
                                          r"line 3\) has 1 document\(s\), and none fell in "
                                          r"(valid|test).*--domains"):
        run(tmp_path, "bin", f"{shards}/*")


def test_the_tokenizer_learns_from_at_most_spm_sample_bytes_of_train_text(tmp_path, shards,
                                                                         monkeypatch):
    seen: list[list[str]] = []
    real = preprocess_module.train_tokenizer

    def recording(texts, *args, **kwargs):
        seen.append(list(texts))
        return real(seen[-1], *args, **kwargs)

    monkeypatch.setattr(preprocess_module, "train_tokenizer", recording)
    whole = run(tmp_path, "whole", f"{shards}/*")
    train_bytes = whole["tokenizer_sample"]["train_bytes"]
    by_key = {f"{name}:{i + 1}": r["text"] for name, records in SHARDS.items()
              for i, r in enumerate(records)}
    train_texts = [by_key[k] for k in split_keys(tmp_path / "whole")["train"]]
    assert seen[0] == train_texts  # the whole train split fits the default: all, in order
    budget = train_bytes // 4
    meta = run(tmp_path, "sampled", f"{shards}/*", spm_sample_bytes=budget)
    sampled_bytes = sum(len(t.encode()) for t in seen[1])
    assert budget // 2 < sampled_bytes <= budget
    assert set(seen[1]) < set(train_texts)
    assert meta["tokenizer_sample"] == {"max_bytes": budget, "documents": len(seen[1]),
                                        "bytes": sampled_bytes, "train_documents": len(train_texts),
                                        "train_bytes": train_bytes}
    run(tmp_path, "again", f"{shards}/*", spm_sample_bytes=budget)
    run(tmp_path, "reseeded", f"{shards}/*", spm_sample_bytes=budget, seed=2)
    assert seen[2] == seen[1] and set(seen[3]) != set(seen[1])


def test_bad_records_stop_the_run_or_are_counted_and_listed_in_meta(tmp_path, shards):
    lines = [json.dumps(r) for r in RECORDS[:40]]
    lines[4] = '{"text": "cut short'
    lines[9] = json.dumps({"text": "no domain here"})
    (shards / "00.jsonl").write_text("\n".join(lines) + "\n")
    (shards / "00.jsonl.zst").unlink()
    with pytest.raises(MoelabError, match=rf"{shards}/00.jsonl line 5 is not valid JSON"):
        run(tmp_path, "stopped", f"{shards}/*")
    assert not (tmp_path / "stopped").exists() or not any((tmp_path / "stopped").iterdir())
    with pytest.warns(UserWarning, match="--skip-bad-lines skipped 2 bad record"):
        meta = run(tmp_path, "bin", f"{shards}/*", skip_bad_lines=True)
    skipped = meta["skipped_documents"]
    assert skipped["bad_records"] == 2
    assert [x["where"] for x in skipped["listed"]] == [f"{shards}/00.jsonl line 5",
                                                     f"{shards}/00.jsonl line 10"]
    assert sum(s["documents"] for s in meta["splits"].values()) == 118


KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    p = importlib.import_module("moelab.data.preprocess")
    where, count = sys.argv[1], int(sys.argv[2])
    calls = [0]
    def kill_on(real):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapped
    if where == "encoding":
        p.SplitWriter.add = kill_on(p.SplitWriter.add)
    else:
        p.os.replace = kill_on(os.replace)
    p.preprocess(p.PreprocessConfig(destdir=sys.argv[3], data=sys.argv[4], force=True,
                 domain_field="meta.pile_set_name", vocab_size=300, valid_fraction=0.2,
                 test_fraction=0.2))
""")


@pytest.mark.parametrize(("where", "count"), [("encoding", 30), ("renaming", 4)])
def test_a_killed_run_leaves_no_data_bin_that_looks_complete(tmp_path, shards, where, count):
    """Killed while encoding, or among the renames over an existing data-bin (--force): no
    meta.json is left beside files of two runs."""
    dest = tmp_path / "bin"
    run(tmp_path, "bin", str(shards / "00.jsonl.zst"))  # an existing, complete data-bin
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLER, where, str(count), str(dest),
                           f"{shards}/*"], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    if where == "encoding":  # the old data-bin is untouched and still complete
        assert [s["path"] for s in read_meta(dest)["shards"]] == [str(shards / "00.jsonl.zst")]
        for split in ("train", "valid", "test"):
            BinarizedDataset(dest, split)
        return
    with pytest.raises(MoelabError, match="is not a moelab data-bin"):
        read_meta(dest)


def test_the_command_line_takes_globs_lists_fields_and_selection(tmp_path, shards, capsys):
    argv = ["preprocess", "--data", f"{shards}/0[01].*", str(shards / "02.jsonl.gz"),
            "--domain-field", "meta.pile_set_name", "--domains", "d0,d1",
            "--max-docs-per-domain", "30", "--spm-sample-bytes", "20000", "--seed", "3",
            "--skip-bad-lines", "--nwordssrc", "300", "--valid-fraction", "0.2",
            "--test-fraction", "0.2", "--destdir", str(tmp_path / "bin")]
    assert main(argv) == 0
    meta = read_meta(tmp_path / "bin")
    assert meta["domains"] == ["d0", "d1"]
    assert sum(s["documents"] for s in meta["splits"].values()) == 60
    assert len(meta["shards"]) == 3 and meta["tokenizer_sample"]["max_bytes"] == 20000
    assert meta["config"]["data"] == [f"{shards}/0[01].*", str(shards / "02.jsonl.gz")]
    assert meta["config"]["seed"] == 3 and meta["config"]["skip_bad_lines"] is True


@pytest.mark.parametrize("count", [0, 1, 5, 100_003])
def test_offsets_files_are_the_bytes_np_save_writes(tmp_path, count):
    values = np.random.default_rng(count).integers(0, 2**40, count, dtype=np.int64)
    values.tofile(tmp_path / "raw.int64")
    _raw_to_npy(tmp_path / "raw.int64", tmp_path / "streamed.npy", block=1000)
    np.save(tmp_path / "saved.npy", values)
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()
    assert not (tmp_path / "raw.int64").exists()


def test_a_run_killed_into_a_new_destdir_leaves_a_staging_folder_that_is_named(tmp_path, shards):
    dest = tmp_path / "fresh"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLER, "encoding", "30", str(dest),
                           f"{shards}/*"], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    with pytest.raises(MoelabError, match="is not a moelab data-bin"):
        read_meta(dest)
    with pytest.raises(MoelabError, match=r"holds only \.moelab-staging-\w+: what a preprocess "
                                          "that was killed had written. Delete it"):
        run(tmp_path, "fresh", f"{shards}/*")


def test_record_fields_with_the_bundled_corpus_are_refused_before_anything_is_written(tmp_path):
    destdir = tmp_path / "bin"
    with pytest.raises(MoelabError, match=r"--bundled is read as it ships.*Leave them out"):
        preprocess(PreprocessConfig(destdir=str(destdir), bundled=True,
                                    domain_field="meta.pile_set_name"))
    assert not destdir.exists()
