"""Every method at equal updates and at equal training compute, and mixtures branched from a
dense LM, on the bundled corpus: one training seed per call, then a summary over the seeds.

    python benchmarks/equal_compute.py --seed 1 --threads 1 --out results/equal-compute
    python benchmarks/equal_compute.py --seed 2 --threads 1 --out results/equal-compute
    python benchmarks/equal_compute.py --summary --out results/equal-compute

Per seed (the Workbench's runs, `--preset cpu` by default):
- all five methods at the preset's max_update (equal updates);
- all five at the compute of the most expensive one's run (equal FLOPs: moelab.train.compute);
- branching: dense trained to half of that budget, then `--finetune-from-model` into each of
  `--branch-methods` until the whole (dense part counted) has spent the budget; against the
  same methods trained from scratch to the same budget (the equal-FLOPs runs).
Each row: test mixture perplexity, NMI, experts used, updates, model FLOPs, training seconds.
The summary gives mean ± standard deviation over the seeds and, paired by seed, how often each
method is below dense at equal FLOPs and each branch below its run from scratch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from moelab import report
from moelab.eval import evaluate_run
from moelab.report.machine import device_name
from moelab.train import Run, train
from moelab.train.checkpoint import BEST
from moelab.train.method import METHODS
from moelab.workbench import Workbench

COLUMNS = ["test ppl", "NMI", "experts used", "updates", "train FLOPs", "train time (s)"]


def rows_of(table: pd.DataFrame, compared: str) -> list[dict]:
    return [{"method": m, "compared": compared, **{c: float(table.loc[m, c]) for c in COLUMNS}}
            for m in table.index]


def one_seed(args: argparse.Namespace) -> dict:
    wb = Workbench(data_bin=args.data_bin, runs_dir=args.out / "runs", preset=args.preset,
                   seeds=[args.seed], device="cpu")
    methods = list(args.methods)
    started = time.perf_counter()
    owner = wb.budget(methods)
    budget = wb.flops_spent(owner)
    wb.train(methods, at="flops")
    rows = rows_of(report.method_table(wb.method_runs(methods)), "equal updates")
    rows += rows_of(report.method_table(wb.method_runs(methods, at="flops")), "equal FLOPs")
    # branching: dense to half the budget, then EM to the budget (the dense part counted)
    home = wb.save_dir("dense").parent / "branch"
    dense_half = home / "dense-half"
    base = {k: v for k, v in wb.train_options_for("dense").items() if k != "save_dir"}
    train(str(wb.ensure_data_bin()), **{**base, "max_update": 0, "max_flops": budget / 2,
                                        "save_dir": str(dense_half), "progress_bar": False})
    branched = []
    for method in args.branch_methods:
        options = {k: v for k, v in wb.train_options_for(method).items() if k != "save_dir"}
        save_dir = home / method
        train(str(wb.ensure_data_bin()), **{**options, "max_update": 0, "max_flops": budget,
                                            "finetune_from_model": str(dense_half /
                                                                       "checkpoint_last.pt"),
                                            "save_dir": str(save_dir), "progress_bar": False})
        run = Run.load(save_dir / BEST)
        branched.append(report.MethodRun(method, valid=evaluate_run(run, "valid", progress=False),
                                         test=evaluate_run(run, "test", progress=False),
                                         history=run.history))
    rows += rows_of(report.method_table(branched), "branched from dense at half the budget")
    return {"seed": args.seed, "preset": args.preset, "budget_method": owner,
            "budget_flops": budget, "threads": torch.get_num_threads(),
            "device": device_name("cpu"), "precision": "float32",
            "torch": torch.__version__, "seconds": time.perf_counter() - started,
            "rows": rows}


def summary(out: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("seed*.json"))]
    if not results:
        raise SystemExit(f"no seed*.json in {out}: run the seeds first")
    frame = pd.DataFrame([{**row, "seed": r["seed"]} for r in results for row in r["rows"]])
    grouped = frame.groupby(["compared", "method"], sort=False)[COLUMNS]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    lines = [f"seeds {', '.join(str(r['seed']) for r in results)}; {results[0]['device']}, "
             f"torch {results[0]['torch']}, {results[0]['precision']}, "
             f"{results[0]['threads']} torch thread(s) per run; budget: "
             + ", ".join(f"seed {r['seed']} {r['budget_method']} {r['budget_flops']:.3e}"
                         for r in results), ""]
    lines.append("| compared | method | " + " | ".join(COLUMNS) + " |")
    lines.append("| --- | --- |" + " --- |" * len(COLUMNS))
    for key in mean.index:
        cells = [f"{mean.loc[key, c]:.4g} ± {std.loc[key, c]:.2g}" for c in COLUMNS]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    ppl = frame.pivot_table(index=["compared", "method"], columns="seed", values="test ppl")
    lines.append("")
    for compared in ("equal updates", "equal FLOPs"):
        dense = ppl.loc[(compared, "dense")]
        for method in [m for m in METHODS if (compared, m) in ppl.index and m != "dense"]:
            below = int((ppl.loc[(compared, method)] < dense).sum())
            lines.append(f"- {compared}: {method} below dense in {below} of {len(dense)} seeds "
                         f"({', '.join(f'{x:.1f}' for x in ppl.loc[(compared, method)])} "
                         f"against {', '.join(f'{x:.1f}' for x in dense)})")
    branch = "branched from dense at half the budget"
    for method in sorted({m for c, m in ppl.index if c == branch}):
        ours, scratch = ppl.loc[(branch, method)], ppl.loc[("equal FLOPs", method)]
        below = int((ours < scratch).sum())
        lines.append(f"- branched {method} below {method} from scratch at equal FLOPs in "
                     f"{below} of {len(ours)} seeds ({', '.join(f'{x:.1f}' for x in ours)} "
                     f"against {', '.join(f'{x:.1f}' for x in scratch)})")
        dense = ppl.loc[("equal FLOPs", "dense")]
        lines.append(f"- branched {method} below dense at equal FLOPs in "
                     f"{int((ours < dense).sum())} of {len(ours)} seeds "
                     f"({', '.join(f'{x:.1f}' for x in ours)} against "
                     f"{', '.join(f'{x:.1f}' for x in dense)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/equal-compute"))
    parser.add_argument("--data-bin", type=Path, default=None,
                        help="the preset's bundled data-bin (default: OUT/data-bin)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--branch-methods", default="hMoEup,hMoElp")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true",
                        help="summarize the seeds found in --out instead of training")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.branch_methods = args.branch_methods.split(",")
    if args.summary:
        print(summary(args.out))
        return 0
    torch.set_num_threads(args.threads)
    args.data_bin = args.data_bin or args.out / "data-bin"
    result = one_seed(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"seed{args.seed}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
