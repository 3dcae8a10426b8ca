"""What each remedy against collapse does to clustering and perplexity, over several seeds.

Trains the chosen methods once per (remedy, seed) on the same data-bin and preset (trained runs
are reused), evaluates them, and writes one table per remedy (each seed, mean and std in CSV;
mean ± std in Markdown) plus a summary of the means: test mixture perplexity, NMI, ARI, experts
used, mean max posterior. The issue's targets are read off the summary. A remedy that means
nothing for a method (a prior bias with a uniform prior) is skipped for it.

    python benchmarks/remedies.py --preset cpu --seeds 1 2 3 --methods hMoEup,hMoElp,sMoElp \\
        --out /tmp/moelab-remedies
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from moelab import report
from moelab.train.objectives import method_flags
from moelab.workbench import Workbench

# name -> the training options that turn the remedy on (none: plain EM)
REMEDIES: dict[str, dict] = {
    "none": {},
    "sinkhorn": {"balance": "sinkhorn"},
    "prior-bias": {"prior_bias_rate": 0.01},
    "anneal": {"estep_temperature": 3.0, "anneal_updates": 100},
    "warm-start": {"init_clusters": "tfidf", "init_updates": 50},
}
COLUMNS = ("test ppl", "NMI", "ARI", "experts used", "mean max posterior")


def applies(remedy: str, method: str) -> bool:
    """A prior bias needs a learned prior; every remedy needs K > 1."""
    if method == "dense":
        return remedy == "none"
    return remedy != "prior-bias" or not method_flags(method)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", default="hMoEup,hMoElp,sMoElp")
    parser.add_argument("--remedies", default=",".join(REMEDIES))
    parser.add_argument("--out", type=Path, default=Path("moelab-remedies"))
    args = parser.parse_args()
    methods = args.methods.split(",")
    rows = []
    for remedy in args.remedies.split(","):
        chosen = [m for m in methods if applies(remedy, m)]
        if not chosen:
            continue
        started = time.perf_counter()
        wb = Workbench(data_bin=args.out / "data-bin", runs_dir=args.out / "runs" / remedy,
                       results_dir=args.out / remedy, preset=args.preset, seeds=args.seeds,
                       train_options=REMEDIES[remedy])
        wb.train(chosen)
        table = wb.method_table(chosen)
        wb.export_table(table, "methods", formats=("csv", "md"))
        means = report.mean_std(table) if len(wb.seeds) > 1 else table
        for method in chosen:
            row = means.loc[method] if method in means.index else None
            rows.append({"remedy": remedy, "method": method,
                         **{c: (row[c] if row is not None and c in row else None)
                            for c in COLUMNS},
                         "minutes": (time.perf_counter() - started) / 60})
    summary = pd.DataFrame(rows).set_index(["remedy", "method"])
    summary.attrs["threads"] = torch.get_num_threads()
    (args.out / "summary.md").write_text(report.to_markdown(summary.reset_index()) + "\n")
    print(f"preset {args.preset}, seeds {args.seeds}, torch threads {torch.get_num_threads()}, "
          "float32, CPU")
    print(report.to_markdown(summary.reset_index()))


if __name__ == "__main__":
    main()
