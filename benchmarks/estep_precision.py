"""How often a lower-precision E-step picks a different expert than the float32 one, and its speed.

The E-step only needs responsibilities, so it could run in a cheaper number format (bf16 on
CPUs with AMX or AVX-512 BF16, FP8 on Hopper). This scores every chunk of a split with a trained
checkpoint, all K experts, once in float32 and once under autocast to each --dtype, and reports
per dtype: the share of chunks whose winning expert changes (`flip_rate`), the mean absolute
change of the responsibilities, and the E-step's time against float32's in the same run.

    python benchmarks/estep_precision.py runs/hMoEup/checkpoint_best.pt data-bin --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from moelab.data import BinarizedDataset, TrainBatches
from moelab.train import load_checkpoint
from moelab.train.method import Method
from moelab.train.scoring import ESTEP_DTYPES, ExpertScorer


def responsibilities(scorer: ExpertScorer, batch) -> torch.Tensor:
    """r = p(z | x, c) (B, K) float32, by the E-step training runs (the scorer's precision).

    The prior is the one the model was trained with: learned where it has a gating network.
    """
    method = Method.parse("hMoEup" if scorer.model.gating is None else "hMoElp")
    scores = scorer.scores(batch, method)
    return scores.e_step().softmax(dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_bin")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=tuple(ESTEP_DTYPES),
                        help="autocast dtypes to compare with float32")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_checkpoint(args.checkpoint)[0].to(device).eval()
    if model.num_experts < 2:
        parser.error("the checkpoint has one expert: nothing to choose between")
    T = model.config.max_seq_len
    batches = TrainBatches(BinarizedDataset(args.data_bin, args.split), tokens_per_sample=T,
                           max_tokens=args.max_tokens, shuffle=False)
    formats = {"float32": ExpertScorer(model)}  # the default E-step, float32
    for name in args.dtype:
        formats[name] = ExpertScorer(model, estep_dtype=ESTEP_DTYPES[name])
    seconds = dict.fromkeys(formats, 0.0)
    flips = dict.fromkeys(formats, 0)
    r_change = dict.fromkeys(formats, 0.0)
    chunks = 0
    for batch in batches.epoch(0):
        batch = batch.to(device)
        base = None
        for name, scorer in formats.items():  # float32 first: the others compare with it
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            r = responsibilities(scorer, batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name] += time.perf_counter() - start
            if base is None:
                base = r
            flips[name] += int((r.argmax(-1) != base.argmax(-1)).sum())
            r_change[name] += float((r - base).abs().sum(-1).sum())
        chunks += batch.tokens.shape[0]
    for name in args.dtype:
        print(json.dumps({
            "dtype": name, "device": str(device), "chunks": chunks, "K": model.num_experts,
            "flip_rate": round(flips[name] / chunks, 5),
            "mean_abs_r_change": round(r_change[name] / chunks, 6),
            "estep_speedup_vs_float32": round(seconds["float32"] / seconds[name], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
