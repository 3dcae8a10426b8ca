"""What each remedy against collapse does to clustering, perplexity and samples, over seeds.

Trains the chosen methods once per (remedy, seed) on the same data-bin and preset (trained runs
are reused), evaluates them and attributes each expert's samples to a domain
(moelab.eval.attribution, as the demo does). Writes one table per remedy (each seed, mean and std in
CSV; mean ± std in Markdown) and a summary over remedies (`summary.csv` long, `summary.md`
mean ± std): test mixture perplexity, NMI, ARI, experts used, mean max posterior, attribution
(the share of experts whose samples read as the domain they own). The issue's targets are read
off the summary. A remedy that means nothing for a method (a prior bias with a uniform prior)
is skipped for it.

    python benchmarks/remedies.py --preset cpu --seeds 1 2 3 --out /tmp/moelab-remedies
    # another corpus in the one-folder-per-domain layout, preprocessed as the preset's data:
    python benchmarks/remedies.py --corpus /tmp/corpus2 --out /tmp/moelab-remedies-corpus2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from moelab import report
from moelab.data import PreprocessConfig, preprocess
from moelab.demo import SAMPLE_TOKENS
from moelab.eval.attribution import attribution_score
from moelab.presets import STUDIES
from moelab.train.method import Method
from moelab.workbench import Workbench

# name -> the training options that turn the remedy on (none: plain EM)
REMEDIES: dict[str, dict] = {
    "none": {},
    "sinkhorn": {"balance": "sinkhorn"},
    "prior-bias": {"prior_bias_rate": 0.01},
    "anneal": {"estep_temperature": 3.0, "anneal_updates": 100},
    "warm-start": {"init_clusters": "tfidf", "init_updates": 50},
}
COLUMNS = ("test ppl", "NMI", "ARI", "experts used", "mean max posterior", "attribution")
ATTRIBUTION_SAMPLES = 3  # per expert, as the demo's default


def applies(remedy: str, method: str) -> bool:
    """Where training refuses a remedy as meaningless: every remedy needs K > 1, a prior bias a
    learned prior, annealing alone soft EM (hard EM's argmax does not depend on T)."""
    m = Method.parse(method)
    if method == "dense":
        return remedy == "none"
    return not ((remedy == "prior-bias" and m.uniform_prior) or (remedy == "anneal" and m.hard))


def seed_table(wb: Workbench, methods: list[str], seed: int) -> pd.DataFrame:
    """report.method_table of one seed, with the attribution score of each method's samples."""
    table = report.method_table(wb.method_runs(methods, seed=seed))
    table["attribution"] = [  # dense has one expert, which owns no domain of its own
        float("nan") if m == "dense" else attribution_score(
            wb.attribution(m, seed=seed, per_expert=ATTRIBUTION_SAMPLES,
                           max_new_tokens=SAMPLE_TOKENS[wb.preset]))
        for m in table.index]
    return table


def corpus_data_bin(corpus: Path, data_bin: Path, preset: str) -> Path:
    """`corpus` (one folder per domain) preprocessed as the preset preprocesses the bundled one;
    an existing data-bin there is reused."""
    if not (data_bin / "meta.json").is_file():
        data = {k: v for k, v in STUDIES[preset].data.items() if k != "documents_per_domain"}
        preprocess(PreprocessConfig(data=str(corpus), destdir=str(data_bin), **data))
    return data_bin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", default="hMoEup,hMoElp,sMoEup,sMoElp")
    parser.add_argument("--remedies", default=",".join(REMEDIES))
    parser.add_argument("--corpus", type=Path, default=None,
                        help="a corpus folder with one folder per domain (default: the bundled)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's)")
    parser.add_argument("--out", type=Path, default=Path("moelab-remedies"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_bin = args.out / "data-bin"
    if args.corpus is not None:
        corpus_data_bin(args.corpus, data_bin, args.preset)
    methods = args.methods.split(",")
    parts = []
    for remedy in args.remedies.split(","):
        chosen = [m for m in methods if applies(remedy, m)]
        if not chosen:
            continue
        started = time.perf_counter()
        wb = Workbench(data_bin=data_bin, runs_dir=args.out / "runs" / remedy,
                       results_dir=args.out / remedy, preset=args.preset, seeds=args.seeds,
                       train_options=REMEDIES[remedy])
        wb.train(chosen)
        tables = {seed: seed_table(wb, chosen, seed) for seed in wb.seeds}
        long = report.over_seeds(tables)
        wb.export_table(long, "methods", formats=("csv", "md"))
        print(f"{remedy}: {(time.perf_counter() - started) / 60:.1f} minutes", flush=True)
        parts.append(long[["seed", *COLUMNS]].assign(remedy=remedy))
    long = pd.concat(parts).reset_index().set_index(["remedy", "method"])
    long.to_csv(args.out / "summary.csv")
    shown = pd.concat({remedy: report.mean_std(part.reset_index("remedy", drop=True))
                       for remedy, part in long.groupby(level="remedy", sort=False)})
    shown.index.names = ["remedy", "method"]
    shown = shown.reset_index(level="method")
    setting = (f"preset {args.preset}, corpus {args.corpus or 'bundled'}, seeds {args.seeds}, "
               f"torch threads {torch.get_num_threads()}, float32, CPU")
    (args.out / "summary.md").write_text(f"{setting}\n\n"
                                         + report.to_markdown(shown) + "\n")
    print(setting)
    print(report.to_markdown(shown))


if __name__ == "__main__":
    main()
