"""benchmarks/corpora_scale.py: its synthetic corpus and its memory measurement."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import zstandard

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("corpora_scale",
                                                  ROOT / "benchmarks" / "corpora_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".jsonl.zst"):
            text = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read().decode()
            out += [json.loads(line) for line in text.splitlines()]
        elif path.suffix == ".parquet":
            out += pq.read_table(path).to_pylist()
    return out


def test_the_corpus_is_seeded_pile_like_and_not_trivially_compressible(tmp_path):
    bench = load_benchmark()
    manifest = bench.write_corpus(tmp_path / "a", size_mb=1, seed=3)
    bench.write_corpus(tmp_path / "b", size_mb=1, seed=3)
    bench.write_corpus(tmp_path / "c", size_mb=1, seed=4)
    docs = records(tmp_path / "a")
    assert docs == records(tmp_path / "b") and docs != records(tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000.jsonl.zst", "001.parquet", "002.jsonl.zst", "003.parquet",
                     "MANIFEST.json"]
    assert {d["meta"]["pile_set_name"] for d in docs} == {f"domain_{i:02d}" for i in range(20)}
    text_bytes = sum(len(d["text"]) for d in docs)
    assert manifest["text_bytes"] == text_bytes >= 1_000_000
    assert manifest["documents"] == len(docs)
    assert text_bytes / manifest["disk_bytes"] < 3  # zstd and Parquet compress it ~2x, no more


def test_peak_memory_sees_a_known_allocation_in_the_child_and_its_workers():
    bench = load_benchmark()
    allocate = ("import subprocess, sys, time; b = bytearray({mb} << 20); time.sleep(0.5); "
                "{then}")
    child = allocate.format(mb=300, then="")
    own = bench.measured([sys.executable, "-c", child], env={})
    assert 300 <= own["peak_rss_mib"] < 400
    grandchild = allocate.format(mb=200, then="")
    parent = allocate.format(mb=100, then=f"subprocess.run([sys.executable, '-c', {grandchild!r}])")
    tree = bench.measured([sys.executable, "-c", parent], env={})
    assert 100 <= tree["peak_rss_mib"] < 200
    assert tree["peak_rss_with_workers_mib"] >= 300


def test_the_plan_memory_is_what_the_train_split_holds(tiny_bin):
    """The figure the issue's "same training memory" rests on: traced numpy memory of the train
    split's chunks and an epoch's plan, at least the epoch's order (an int32 per chunk)."""
    from moelab.data import BinarizedDataset

    found = load_benchmark().plan_memory(tiny_bin, tokens_per_sample=2, max_tokens=16)
    chunks = len(BinarizedDataset(tiny_bin, "train").chunks(2))
    assert found["chunks"] == chunks > 20_000 and found["documents"] > 0
    assert 4 * chunks <= found["held_bytes"] < 5 * chunks + 64 * found["documents"] + 16384
    assert found["peak_bytes"] >= found["held_bytes"]
