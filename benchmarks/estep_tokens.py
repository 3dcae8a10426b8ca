"""What the E-step shortcuts (`--estep-tokens M`, `--estep-dtype`) cost in clustering and speed.

Trains hMoEup on the bundled corpus with the demo's `cpu` preset (K = 7, T = 128, 200 updates),
once with the full float32 E-step, once per M and once per --estep-dtype, for each seed; then
scores the test split with `moelab.eval.lm` (all K experts, whole documents) and reports NMI,
ARI, mixture perplexity and training tokens/s per run, one JSON line each, then a Markdown table
of the means.

    python benchmarks/estep_tokens.py --root /tmp/estep --tokens 64 32 16 --seeds 1 2 \
        --estep-dtype bfloat16

Runs are cached under --root (delete a run's folder to retrain it); timings come from the
training log, so they are only comparable between runs made on the same, equally busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from moelab.data import BinarizedDataset
from moelab.eval.lm import evaluate
from moelab.train import load_checkpoint, read_history, train
from moelab.train.scoring import ESTEP_DTYPES
from moelab.workbench import DATA_PRESETS, EXPERT_PRESETS, TRAIN_PRESETS, ensure_data_bin


def run_one(data_bin: Path, save_dir: Path, *, estep_tokens: int | None,
            estep_dtype: str | None, seed: int) -> dict:
    options = {**TRAIN_PRESETS["cpu"], "method": "hMoEup", "num_experts": EXPERT_PRESETS["cpu"],
               "estep_tokens": estep_tokens, "estep_dtype": estep_dtype, "seed": seed,
               "save_dir": str(save_dir), "device": "cpu", "progress_bar": False}
    if not (save_dir / "checkpoint_best.pt").is_file():
        train(str(data_bin), **options)
    history = read_history(save_dir)
    train_lines = history[history["kind"] == "train"]
    model = load_checkpoint(save_dir / "checkpoint_best.pt")[0].eval()
    T = TRAIN_PRESETS["cpu"]["tokens_per_sample"]
    result = evaluate(model, BinarizedDataset(data_bin, "test"), tokens_per_sample=T,
                      context_window=T // 2, progress=False)
    return {"estep_tokens": estep_tokens, "estep_dtype": estep_dtype, "seed": seed,
            "nmi": round(float(result.clusters["nmi"]), 4),
            "ari": round(float(result.clusters["ari"]), 4),
            "test_mixture_ppl": round(float(result.perplexity.loc["overall", "mixture"]), 2),
            "experts_used": int(result.summary["experts_used"]),
            "train_tokens_per_s": round(float(train_lines["tokens_per_s"].median()), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="estep-tokens-runs", help="data-bin and runs go here")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 32, 16],
                        help="the M values to compare with the full E-step")
    parser.add_argument("--estep-dtype", nargs="*", default=[], choices=tuple(ESTEP_DTYPES),
                        help="also train with the whole chunk's E-step in these dtypes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    data_bin = ensure_data_bin(root / "data-bin", **DATA_PRESETS["cpu"])
    variants = [(None, None), *((m, None) for m in args.tokens),
                *((None, d) for d in args.estep_dtype)]
    rows = []
    for m, dtype in variants:
        for seed in args.seeds:
            name = f"M{m or 'all'}{'-' + dtype if dtype else ''}-seed{seed}"
            row = run_one(data_bin, root / name, estep_tokens=m, estep_dtype=dtype, seed=seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
    T = TRAIN_PRESETS["cpu"]["tokens_per_sample"]
    print("\n| E-step | NMI | ARI | test mixture ppl | experts used | train tokens/s |")
    print("|---|---|---|---|---|---|")
    for m, dtype in variants:
        mine = [r for r in rows if (r["estep_tokens"], r["estep_dtype"]) == (m, dtype)]

        def mean(key: str, mine=mine) -> float:
            return statistics.mean(r[key] for r in mine)
        label = f"first {m} tokens" if m else f"all {T} tokens"
        print(f"| {label}, {dtype or 'float32'} | {mean('nmi'):.3f} | {mean('ari'):.3f} "
              f"| {mean('test_mixture_ppl'):.1f} | {mean('experts_used'):.1f} "
              f"| {mean('train_tokens_per_s'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
