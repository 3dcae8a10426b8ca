"""Preprocessing and training memory on a sharded corpus as big as you ask: does it stay flat?

Writes a Pile-like synthetic corpus of `--size-mb` MB of text (20 domains, each with its own
Zipf-distributed vocabulary of letter strings, so the text is not trivially compressible;
documents of log-normal length shuffled across domains; half the shards zstd JSON lines, half
Parquet; the domain at `meta.pile_set_name`; seeded), then in child processes:

1. `moelab preprocess --data 'DIR/*.jsonl.zst' 'DIR/*.parquet' --domain-field
   meta.pile_set_name` with the preset's vocabulary: wall time, peak resident memory, encoded
   tokens per second (every split's tokens over the whole preprocess wall time);
2. 50 training updates of the preset (hMoEup, its K) on that data-bin, then its final
   validation: wall time, the peak resident memory of the updates (the high-water mark at the
   last logged update, before the final validation) and of the whole run (the final validation
   and checkpoint, which do not depend on the train split, add about 100 MiB and vary by
   +-20 MiB from run to run), and at the last update the anonymous memory (what the process
   allocated) apart from the file-backed pages (the memory-mapped tokens it has read, the
   libraries);
3. in this process, the numpy memory (tracemalloc: exact, the same in every run) of what
   training builds from the train split: opening it and planning two epochs' batches.

Peak memory is read from /proc (no psutil): the child's own high-water mark (VmHWM) and the
largest sum of the resident sets of the child and its descendants (preprocess's encoding
workers) seen by polling every 50 ms. The valid and test shares are set so that each holds about
`--held-out-docs` documents whatever the corpus size, so that training differs between sizes
only by the train split.

    python benchmarks/corpora_scale.py --size-mb 100 --workers 4 --json corpora-100.json
    python benchmarks/corpora_scale.py --size-mb 1000 --workers 4 --json corpora-1000.json

The corpus is kept in `--corpus-dir` (default: a folder per size and seed under the system's
temporary folder) and reused when its manifest matches. Prints a line per step and one JSON line
with everything (also written to --json): device, threads, sizes, times and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DOMAINS = 20
WORDS_PER_DOMAIN = 4000
SHARD_MB = 50  # text per shard; at least 4 shards, so both formats are always there
LETTERS = "abcdefghijklmnopqrstuvwxyz"
POLL_SECONDS = 0.05


def domain_vocabulary(rng: np.random.Generator, domain: int) -> tuple[np.ndarray, np.ndarray]:
    """A domain's words (strings over its own 12 letters) and their Zipf probabilities."""
    letters = np.array(list(LETTERS))[rng.permutation(26)[:12]]
    lengths = rng.integers(2, 10, WORDS_PER_DOMAIN)
    words = np.array(["".join(rng.choice(letters, n)) for n in lengths], dtype=object)
    weights = 1.0 / np.arange(1, WORDS_PER_DOMAIN + 1) ** 1.1
    return words, np.cumsum(weights / weights.sum())


def documents(rng: np.random.Generator, vocabularies, count: int):
    """`count` records: text of log-normal length (median ~500 words) from a random domain."""
    domains = rng.integers(0, DOMAINS, count)
    lengths = np.clip(rng.lognormal(np.log(500), 0.8, count).astype(int), 20, 20_000)
    for domain, length in zip(domains.tolist(), lengths.tolist(), strict=True):
        words, cumulative = vocabularies[domain]
        picked = words[np.searchsorted(cumulative, rng.random(length))]
        # a line break every ~12 words, a full stop every ~20: text, not one long line
        picked[rng.random(length) < 1 / 20] += "."
        separators = np.where(rng.random(length) < 1 / 12, "\n", " ").astype(object)
        text = "".join(picked + separators)
        yield {"text": text.rstrip(), "meta": {"pile_set_name": f"domain_{domain:02d}"}}


def write_corpus(folder: Path, size_mb: int, seed: int) -> dict:
    """Shards totalling about size_mb MB of text; reused when the manifest matches."""
    manifest_path = folder / "MANIFEST.json"
    wanted = {"size_mb": size_mb, "seed": seed, "domains": DOMAINS, "version": 1}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            return manifest
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    vocabularies = [domain_vocabulary(rng, d) for d in range(DOMAINS)]
    shards = max(4, round(size_mb / SHARD_MB))
    per_shard = size_mb * 1_000_000 / shards
    text_bytes = docs = 0
    started = time.perf_counter()
    for index in range(shards):
        records, written = [], 0
        while written < per_shard:
            batch = list(documents(rng, vocabularies, 64))
            records += batch
            written += sum(len(r["text"]) for r in batch)
        text_bytes, docs = text_bytes + written, docs + len(records)
        if index % 2 == 0:
            path = folder / f"{index:03d}.jsonl.zst"
            data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
            path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
        else:
            path = folder / f"{index:03d}.parquet"
            pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2048)
        print(f"  wrote {path.name} ({len(records)} documents)", flush=True)
    manifest = {**wanted, "shards": shards, "documents": docs, "text_bytes": text_bytes,
                "disk_bytes": sum(p.stat().st_size for p in folder.iterdir()),
                "seconds": round(time.perf_counter() - started, 1)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        found += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return found


def measured(command: list[str], env: dict) -> dict:
    """Run `command` as a child; its wall time and peak memory (own and with descendants)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    own_peak = tree_peak = 0
    while child.poll() is None:
        own_peak = max(own_peak, _status_kib(child.pid, "VmHWM"))
        tree = [child.pid, *_descendants(child.pid)]
        tree_peak = max(tree_peak, sum(_status_kib(p, "VmRSS") for p in tree))
        time.sleep(POLL_SECONDS)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed with status {child.returncode}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(own_peak / 1024, 1),
            "peak_rss_with_workers_mib": round(max(tree_peak, own_peak) / 1024, 1)}


TRAIN = """
import json, sys, torch
from pathlib import Path
from moelab.presets import STUDIES
from moelab.train import train
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
study = STUDIES[args["preset"]]
options = {**study.train, "max_update": args["updates"], "validate_interval_updates": 0,
           "warmup_updates": min(study.train["warmup_updates"], args["updates"])}
def memory(record):  # at each logged update; the last, before the final validation, stays
    lines = Path("/proc/self/status").read_text().splitlines()
    status = dict(line.split(":", 1) for line in lines)
    kib = {k: int(status[k].split()[0]) for k in ("VmHWM", "RssAnon", "RssFile")}
    Path(args["updates_memory_file"]).write_text(json.dumps(kib))
train(args["data"], method="hMoEup", num_experts=study.num_experts, save_dir=args["save_dir"],
      device="cpu", progress_bar=False, on_log=memory, **options)
"""


def plan_memory(data_bin: Path, tokens_per_sample: int, max_tokens: int) -> dict:
    """Numpy memory of what training builds from the train split (its chunks, two epochs'
    batch plans), traced exactly: held after the second epoch's plan, and the peak."""
    import tracemalloc

    from moelab.data import BinarizedDataset, TrainBatches

    def plan(split: str) -> TrainBatches:
        batches = TrainBatches(BinarizedDataset(data_bin, split), seed=1,
                               tokens_per_sample=tokens_per_sample, max_tokens=max_tokens)
        batches.batch(0, 0)
        batches.batch(1, 0)
        return batches

    plan("valid")  # once untraced, so that what the first call loads and caches is not counted
    tracemalloc.start()
    try:
        batches = plan("train")
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"chunks": len(batches.chunks), "documents": len(batches.ds),
            "held_bytes": held, "peak_bytes": peak,
            "held_mib": round(held / 2**20, 1), "peak_mib": round(peak / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100, help="MB of text in the corpus")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--preset", default="cpu", choices=["cpu", "smoke"])
    parser.add_argument("--workers", type=int, default=1, help="preprocess --workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--held-out-docs", type=int, default=200,
                        help="about this many valid (and test) documents at any size")
    parser.add_argument("--corpus-dir", type=Path, default=None)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the data-bin and the run go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from moelab.presets import STUDIES

    corpus = args.corpus_dir or Path(tempfile.gettempdir()) / (
        f"moelab-corpora-{args.size_mb}mb-seed{args.seed}")
    print(f"corpus: {args.size_mb} MB in {corpus}", flush=True)
    manifest = write_corpus(corpus, args.size_mb, args.seed)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="moelab-corpora-scale-"))
    data_bin, save_dir = work / "data-bin", work / "run"
    shutil.rmtree(data_bin, ignore_errors=True)
    shutil.rmtree(save_dir, ignore_errors=True)
    held_out = min(0.2, args.held_out_docs / manifest["documents"])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    preprocess_command = [
        sys.executable, "-m", "moelab", "preprocess", "--data", f"{corpus}/*.jsonl.zst",
        f"{corpus}/*.parquet",
        "--domain-field", "meta.pile_set_name", "--destdir", str(data_bin),
        "--nwordssrc", str(STUDIES[args.preset].data["vocab_size"]),
        "--valid-fraction", f"{held_out:.6f}", "--test-fraction", f"{held_out:.6f}",
        "--workers", str(args.workers)]
    print("preprocess ...", flush=True)
    prep = measured(preprocess_command, env)
    meta = json.loads((data_bin / "meta.json").read_text())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    prep.update(tokens=tokens, tokens_per_s=round(tokens / prep["seconds"]),
                splits=meta["splits"], tokenizer_sample=meta["tokenizer_sample"],
                data_bin_bytes=sum(p.stat().st_size for p in data_bin.iterdir()))
    print(f"preprocess: {prep['seconds']} s, peak {prep['peak_rss_mib']} MiB "
          f"({prep['peak_rss_with_workers_mib']} MiB with workers), "
          f"{prep['tokens_per_s']} tokens/s", flush=True)

    print(f"train: {args.updates} updates of the {args.preset} preset ...", flush=True)
    memory_file = work / "updates-memory-kib.json"
    train_args = {"data": str(data_bin), "preset": args.preset, "updates": args.updates,
                  "threads": args.threads, "save_dir": str(save_dir),
                  "updates_memory_file": str(memory_file)}
    trained = measured([sys.executable, "-c", TRAIN, json.dumps(train_args)], env)
    at_last_update = json.loads(memory_file.read_text())
    trained.update(updates_peak_rss_mib=round(at_last_update["VmHWM"] / 1024, 1),
                   last_update_anon_mib=round(at_last_update["RssAnon"] / 1024, 1),
                   last_update_file_mib=round(at_last_update["RssFile"] / 1024, 1))
    print(f"train: {trained['seconds']} s, peak {trained['updates_peak_rss_mib']} MiB over the "
          f"updates, {trained['peak_rss_mib']} MiB with the final validation", flush=True)
    preset = STUDIES[args.preset].train
    trained["data_plan"] = plan_memory(data_bin, preset["tokens_per_sample"],
                                       preset["max_tokens"])
    print(f"train split: {trained['data_plan']}", flush=True)

    import torch

    from moelab.report.machine import device_name

    result = {
        "benchmark": "corpora_scale", "size_mb": args.size_mb, "seed": args.seed,
        "preset": args.preset, "updates": args.updates, "corpus": manifest,
        "held_out_fraction": held_out, "preprocess": prep, "train": trained,
        "device": f"cpu: {device_name('cpu')}", "precision": "float32",
        "preprocess_workers": args.workers, "train_threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average": os.getloadavg()[0],
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
