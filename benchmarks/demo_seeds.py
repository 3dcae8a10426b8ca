"""The demo's comparison over several training seeds: mean and spread per method.

One seed decides nothing (a change as small as the rounding of the loss moved a method's test
perplexity by 20%), so every claim that one method beats another rests on this table. Each seed
trains the demo's methods with the same preset on the same data-bin, in its own runs folder;
seeds already trained are reused. Writes per-seed rows and the summary (CSV and Markdown) to
--out and prints the summary.

    python benchmarks/demo_seeds.py --preset cpu --seeds 1 2 3 --out /tmp/moelab-seeds
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from moelab import report
from moelab.train.objectives import METHODS
from moelab.workbench import Workbench

# column -> decimals; training speed is left out: it is only comparable on an idle machine
COLUMNS = {"test ppl": 1, "test oracle ppl": 1, "experts used": 1, "NMI": 3, "ARI": 3,
           "mean max posterior": 3, "expert spread": 3}


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± standard deviation over seeds per method, and in how many seeds the method's test
    perplexity is below dense's of the same seed (a paired comparison)."""
    columns = [c for c in COLUMNS if c in rows.columns]
    grouped = rows.groupby(level=0, sort=False)[columns]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    summary = pd.DataFrame({c: [f"{m:.{COLUMNS[c]}f} ± {s:.{COLUMNS[c]}f}"
                                for m, s in zip(mean[c], std[c], strict=True)]
                            for c in columns}, index=mean.index)
    summary.insert(0, "seeds", rows.groupby(level=0, sort=False).size())
    if "dense" in rows.index:
        dense = rows.loc[["dense"]].set_index("seed")["test ppl"]
        below = {m: int((g.set_index("seed")["test ppl"] < dense).sum())
                 for m, g in rows.groupby(level=0, sort=False)}
        summary["seeds below dense"] = [below[m] if m != "dense" else "" for m in summary.index]
    return summary


def run_seed(out: Path, preset: str, seed: int, methods: list[str]) -> pd.DataFrame:
    wb = Workbench(data_bin=out / "data-bin", runs_dir=out / f"runs-seed{seed}",
                   results_dir=out / f"results-seed{seed}", preset=preset,
                   train_options={"seed": seed})
    wb.train(methods)
    table = report.method_table(wb.method_runs(methods))
    table.insert(0, "seed", seed)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("moelab-seeds"))
    args = parser.parse_args()
    methods = args.methods.split(",")
    started = time.perf_counter()
    rows = pd.concat([run_seed(args.out, args.preset, s, methods) for s in args.seeds])
    rows.index.name = "method"
    rows.to_csv(args.out / "per_seed.csv")
    summary = summarize(rows)
    summary.to_csv(args.out / "summary.csv")
    where = (f"torch {torch.__version__}, {platform.machine()}, "
             f"{torch.get_num_threads()} threads, float32; preset {args.preset}; seeds "
             f"{args.seeds}; {(time.perf_counter() - started) / 60:.1f} min")
    text = f"{report.to_markdown(summary)}\n\nmean ± standard deviation over seeds; {where}\n"
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
