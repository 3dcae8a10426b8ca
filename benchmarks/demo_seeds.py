"""The demo's comparison over several training seeds: mean and spread per method.

One seed decides nothing (a change as small as the rounding of the loss moved a method's test
perplexity by 20%), so every claim that one method beats another rests on this table. A thin
caller of `Workbench(seeds=...)`: each seed trains the demo's methods with the same preset on the
same data-bin (seed 1 in runs/<method>, seed k in runs/seed<k>/<method>); trained seeds are
reused. Writes the table (each seed and the mean and std in CSV; mean ± std in Markdown) to
--out and prints it. `moelab demo --seeds 3` gives the same table inside the full report.

    python benchmarks/demo_seeds.py --preset cpu --seeds 1 2 3 --out /tmp/moelab-seeds
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moelab import report
from moelab.train.method import METHODS
from moelab.workbench import Workbench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("moelab-seeds"))
    args = parser.parse_args()
    methods = args.methods.split(",")
    wb = Workbench(data_bin=args.out / "data-bin", runs_dir=args.out / "runs",
                   results_dir=args.out, preset=args.preset, seeds=args.seeds)
    wb.train(methods)
    table = wb.method_table(methods)
    wb.export_table(table, "summary", formats=("csv", "md"))
    print(report.to_markdown(report.mean_std(table) if len(wb.seeds) > 1 else table))


if __name__ == "__main__":
    main()
