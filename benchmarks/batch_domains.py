"""How often a training batch holds one domain: fairseq's shuffle-then-sort against sort alone.

For each preset (the bundled corpus preprocessed as `moelab demo --preset P` does), one epoch of
training batches is formed twice: as moelab forms them (a seeded permutation of the chunks, then a
stable sort by length) and by the stable sort alone (what moelab did before). Random batching,
the same batch sizes filled with chunks at random, is the reference. Prints one JSON line per
preset: single-domain share and documents per batch for each way.

    python benchmarks/batch_domains.py --presets cpu gpu --work /tmp/moelab-batch-domains
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moelab.data import BinarizedDataset, TrainBatches, batch_by_size
from moelab.workbench import DATA_PRESETS, TRAIN_PRESETS, ensure_data_bin


def describe(batches: list[np.ndarray], domains: np.ndarray, docs: np.ndarray) -> dict:
    return {"single_domain_share": float(np.mean([len(set(domains[b])) == 1 for b in batches])),
            "documents_per_batch": float(np.mean([len(set(docs[b])) for b in batches]))}


def measure(preset: str, work: Path, seed: int) -> dict:
    data_bin = ensure_data_bin(work / f"data-bin-{preset}", **DATA_PRESETS[preset])
    options = TRAIN_PRESETS[preset]
    ds = BinarizedDataset(data_bin, "train")
    tb = TrainBatches(ds, tokens_per_sample=options["tokens_per_sample"],
                      max_tokens=options["max_tokens"], seed=seed)
    domains = np.asarray([ds.domain_ids[c.doc] for c in tb.chunks])
    docs = np.asarray([c.doc for c in tb.chunks])
    shuffled = tb.batches(1)
    sorted_only = batch_by_size(tb.chunks.lengths, tb.max_tokens)
    sizes = np.cumsum([len(b) for b in shuffled])[:-1]
    rng = np.random.default_rng(seed)
    random = [describe(np.split(rng.permutation(len(domains)), sizes), domains, docs)
              for _ in range(20)]
    return {"preset": preset, "batches": len(shuffled), "chunks": len(tb.chunks),
            "domains": len(ds.domains), "moelab": describe(shuffled, domains, docs),
            "sort_only_before": describe(sorted_only, domains, docs),
            "random": {k: float(np.mean([r[k] for r in random])) for k in random[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "gpu"], choices=TRAIN_PRESETS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moelab-batch-domains"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        print(json.dumps(measure(preset, args.work, args.seed)), flush=True)


if __name__ == "__main__":
    main()
