"""The corpus that ships inside moelab: its manifest, its size, and lossless preprocessing."""

from __future__ import annotations

import json

import pytest

from moelab.data import BinarizedDataset, PreprocessConfig, bundled_corpus, manifest, preprocess
from moelab.data.bundled import BUNDLED_DIR


def test_manifest_names_source_version_and_licence_of_six_or_more_domains():
    domains = manifest()["domains"]
    assert len(domains) >= 6
    for d in domains:
        assert d["package"] and d["version"] and d["licence"], d["name"]
        assert (BUNDLED_DIR / d["licence_file"]).is_file()
        assert d["bytes_utf8"] >= 900_000, f"{d['name']} is under roughly 1 MB"
    compressed = sum(p.stat().st_size for p in BUNDLED_DIR.glob("*.jsonl.xz"))
    assert compressed < 15 * 2**20


def test_manifest_counts_match_the_files():
    counts: dict[str, int] = {}
    for doc in bundled_corpus():
        counts[doc.domain] = counts.get(doc.domain, 0) + 1
        assert doc.text.strip()
    assert counts == {d["name"]: d["documents"] for d in manifest()["domains"]}


@pytest.fixture(scope="module")
def bundled_bin(tmp_path_factory):
    destdir = tmp_path_factory.mktemp("bundled") / "mix"
    preprocess(PreprocessConfig(destdir=str(destdir), bundled=True, vocab_size=8000))
    return destdir


@pytest.mark.slow
def test_every_bundled_document_round_trips(bundled_bin):
    originals = {doc.key: doc.text for doc in bundled_corpus()}
    meta = json.loads((bundled_bin / "meta.json").read_text())
    assert meta["domains"] == sorted(d["name"] for d in manifest()["domains"])
    checked = 0
    for split in ("train", "valid", "test"):
        ds = BinarizedDataset(bundled_bin, split)
        tokenizer = ds.tokenizer()
        keys = [json.loads(line)["key"] for line in (bundled_bin / f"{split}.docs.jsonl").open()]
        assert len(keys) == len(ds) > 0
        assert tokenizer.sp.unk_id() not in ds.tokens  # byte fallback: nothing becomes <unk>
        for i, key in enumerate(keys):
            assert tokenizer.decode(ds.document(i)) == originals[key], key
            checked += 1
    assert checked == len(originals)
