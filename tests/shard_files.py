"""Writing small shards in every format the sharded reader takes, for the tests that read them."""

from __future__ import annotations

import gzip
import json
import lzma
import random
from pathlib import Path

FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".parquet")


def write_shard(path: Path, records: list[dict]) -> Path:
    """``records`` as a shard whose format is the path's suffix (nested dicts stay nested)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=7)
        return path
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".xz"):
        data = lzma.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def pile_records(domains: tuple[str, ...], per_domain: int, *, seed: int = 0,
                 words: int = 60) -> list[dict]:
    """Pile-like records: text, and the domain at meta.pile_set_name; each domain its own words,
    the domains interleaved as in a shuffled public corpus."""
    rng = random.Random(seed)
    records = []
    for d, domain in enumerate(domains):
        letters = "abcdefghijklmnopqrstuvwxyz"[d * 5 % 20 : d * 5 % 20 + 7]
        vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
                      for _ in range(30)]
        for i in range(per_domain):
            text = " ".join(rng.choice(vocabulary) for _ in range(words))
            records.append({"text": f"{domain} {i}: {text}", "meta": {"pile_set_name": domain}})
    rng.shuffle(records)
    return records
