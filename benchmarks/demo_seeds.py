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

COLUMNS = ("test ppl", "test oracle ppl", "experts used", "NMI", "ARI", "mean max posterior",
           "expert spread", "tokens/s")


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
    columns = [c for c in COLUMNS if c in rows.columns]
    grouped = rows.groupby(level=0, sort=False)[columns]
    summary = grouped.mean().round(3).astype(str) + " ± " + grouped.std(ddof=1).round(3).astype(str)
    summary.insert(0, "seeds", len(args.seeds))
    summary.to_csv(args.out / "summary.csv")
    where = (f"torch {torch.__version__}, {platform.machine()}, "
             f"{torch.get_num_threads()} threads, float32; preset {args.preset}; seeds "
             f"{args.seeds}; {(time.perf_counter() - started) / 60:.1f} min")
    text = f"{report.to_markdown(summary)}\n\nmean ± standard deviation over seeds; {where}\n"
    (args.out / "summary.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
