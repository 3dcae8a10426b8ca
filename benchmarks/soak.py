"""Soak test: a long CPU run of the tiny preset, watching memory and the files it leaves.

Trains `--updates` updates (default 2,000) of the tiny preset with validation (and so a checkpoint
save) every `--eval-interval` updates (default 100), samples the resident memory of the process
(VmRSS from /proc/self/status, no psutil) at every validation and at every log line, and at the
end checks that the log and the checkpoints agree with each other and with the model in memory.

Memory growth is measured as a slope: a least-squares line through the log-line samples after the
first validation (the allocator's warm-up), in KiB per update. Before each sample the garbage
collector runs and glibc's malloc_trim hands freed heap pages back to the kernel, so the resident
set follows live memory and not the allocator's high-water mark. `--inject-leak graph` plants a
known leak (every update's loss kept with its autograd graph) so that a test can show the slope
catches it:

    python benchmarks/soak.py                          # bundled corpus, 2,000 updates
    python benchmarks/soak.py --data data-bin/mix --updates 300 --eval-interval 50 --json out.json

Prints the RSS at the first validation, at the last one and the growth in between, then one JSON
line with everything (also written to --json). Exit status 1 if a consistency check fails.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux), NaN where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def settled_rss_mb() -> float:
    """rss_mb after a garbage collection and glibc's malloc_trim (where there is a glibc)."""
    gc.collect()
    with_trim = _libc()
    if with_trim is not None:
        with_trim.malloc_trim(0)
    return rss_mb()


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            name = ctypes.util.find_library("c")
            libc = ctypes.CDLL(name) if name else None
            _LIBC.append(libc if libc is not None and hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def least_squares_slope(points: list[tuple[float, float]]) -> float:
    """Slope of the least-squares line through (x, y) points; 0 for fewer than two x values."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if len(xs) < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return covariance / var if var else 0.0


LEAKS = ("none", "graph")
LEAKED: list = []  # what --inject-leak keeps alive


def inject_leak(kind: str) -> None:
    """Plant a known leak in this process (for the test that proves the slope catches one).

    graph: every update's loss tensor is kept with its autograd graph (`losses.append(loss)`
    where `loss.item()` was meant), the classic training-loop leak: ~70 KiB per update for the
    tiny model at --tokens-per-sample 32 --max-tokens 256 (backward frees the saved activations;
    the graph's nodes stay).
    """
    from moelab.train import update

    if kind == "graph":
        forward = update.EMStep.forward

        def leaking_forward(self, batch, *args, **kwargs):
            out = forward(self, batch, *args, **kwargs)
            LEAKED.append(out[0])  # the summed loss, grad_fn and all
            return out
        update.EMStep.forward = leaking_forward
    elif kind != "none":
        raise ValueError(f"--inject-leak must be one of {', '.join(LEAKS)}")


def bundled_data_bin(folder: Path) -> Path:
    from moelab.data import PreprocessConfig, preprocess

    dest = folder / "bundled-bin"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess(PreprocessConfig(destdir=str(dest), bundled=True, vocab_size=2000))
    return dest


def check_consistency(save_dir: Path, result, updates: int, eval_interval: int,
                      log_interval: int) -> list[str]:
    """What must hold after a clean run; returns the problems found (none: an empty list)."""
    from moelab.train import read_history
    from moelab.train.checkpoint import read_checkpoint

    problems = []
    history = read_history(save_dir)
    train_rows = history[history.kind == "train"]
    valid_rows = history[history.kind == "valid"]
    want_train = list(range(log_interval, updates + 1, log_interval))
    want_valid = sorted({*range(eval_interval, updates, eval_interval), updates})
    if list(train_rows["update"]) != want_train:
        problems.append(f"train log updates {list(train_rows['update'])[:5]}... != "
                        f"{want_train[:5]}...")
    if list(valid_rows["update"]) != want_valid:
        problems.append(f"valid log updates {list(valid_rows['update'])} != {want_valid}")
    for column in ("loss", "nll", "grad_norm"):
        if not history[column].dropna().map(math.isfinite).all():
            problems.append(f"non-finite {column} in the log")
    if train_rows["skipped_updates"].max() > 0:
        problems.append(f"{int(train_rows['skipped_updates'].max())} updates were skipped")

    last = read_checkpoint(save_dir / "checkpoint_last.pt")
    prev = read_checkpoint(save_dir / "checkpoint_last.prev.pt")
    best = read_checkpoint(save_dir / "checkpoint_best.pt")
    if last["num_updates"] != updates:
        problems.append(f"checkpoint_last is at update {last['num_updates']}, not {updates}")
    if len(want_valid) > 1 and prev["num_updates"] != want_valid[-2]:
        problems.append(f"checkpoint_last.prev is at {prev['num_updates']}, not {want_valid[-2]}")
    for name, tensor in result.model.state_dict().items():
        if not torch.equal(tensor.cpu(), last["model"][name].cpu()):
            problems.append(f"checkpoint_last's {name} differs from the model in memory")
            break
    best_row = valid_rows.loc[valid_rows.loss.idxmin()]
    if best["num_updates"] != best_row["update"] or best["best_valid_loss"] != best_row["loss"]:
        problems.append(f"checkpoint_best is at update {best['num_updates']} (valid loss "
                        f"{best['best_valid_loss']}) but the log's best is update "
                        f"{best_row['update']} ({best_row['loss']})")
    if last["best_valid_loss"] != valid_rows.loss.min():
        problems.append("checkpoint_last's best_valid_loss is not the log's minimum")
    leftovers = [p.name for p in save_dir.iterdir() if p.name.endswith(".tmp")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a data-bin (default: preprocess the bundled corpus)")
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--method", default="hMoElp")
    parser.add_argument("--num-experts", type=int, default=3)
    parser.add_argument("--tokens-per-sample", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", help="save dir (default: a temporary folder)")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--inject-leak", choices=LEAKS, default="none",
                        help="plant a known leak, to check that the RSS slope shows it")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    inject_leak(args.inject_leak)

    from moelab.train import train

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else bundled_data_bin(Path(tmp))
        save_dir = Path(args.out) if args.out else Path(tmp) / "run"
        samples: list[tuple[int, float]] = [(0, rss_mb())]  # at every validation
        trace: list[tuple[int, float]] = []  # settled, at every log line

        def on_log(record: dict) -> None:
            trace.append((record["update"], settled_rss_mb()))

        def on_eval(record: dict) -> None:
            samples.append((record["update"], rss_mb()))
            print(f"soak: update {record['update']:5d}  valid loss {record['loss']:.4f}  "
                  f"RSS {samples[-1][1]:.1f} MiB", flush=True)

        started = time.perf_counter()
        result = train(data, arch="tiny", method=args.method, num_experts=args.num_experts,
                       max_update=args.updates, validate_interval_updates=args.eval_interval,
                       log_interval=args.log_interval, tokens_per_sample=args.tokens_per_sample,
                       max_tokens=args.max_tokens, warmup_updates=min(100, args.updates // 4),
                       lr=1e-3, save_dir=save_dir, device="cpu", progress_bar=False,
                       on_log=on_log, on_eval=on_eval)
        seconds = time.perf_counter() - started
        problems = check_consistency(save_dir, result, args.updates, args.eval_interval,
                                     args.log_interval)

    evals = samples[1:]
    first, last = evals[0], evals[-1]
    # MiB per update: a least-squares line through the settled samples after the first validation
    slope = least_squares_slope([(u, r) for u, r in trace if u > first[0]])
    summary = {
        "updates": args.updates, "eval_interval": args.eval_interval, "seconds": round(seconds, 1),
        "rss_mb_start": round(samples[0][1], 1),
        "rss_mb_first_eval": round(first[1], 1), "first_eval_update": first[0],
        "rss_mb_last_eval": round(last[1], 1), "last_eval_update": last[0],
        "rss_growth_mb": round(last[1] - first[1], 1),
        "rss_max_mb": round(max(r for _, r in evals), 1),
        "rss_slope_mb_per_1000_updates": round(slope * 1000, 2),
        "rss_slope_kib_per_update": round(slope * 1024, 2),
        "rss_slope_from_update": first[0],
        "rss_samples": [[u, round(r, 1)] for u, r in samples],
        "rss_trace": [[u, round(r, 2)] for u, r in trace],
        "inject_leak": args.inject_leak,
        "consistent": not problems, "problems": problems,
    }
    print(f"soak: RSS {first[1]:.1f} MiB at update {first[0]}, {last[1]:.1f} MiB at update "
          f"{last[0]} (growth {last[1] - first[1]:+.1f} MiB; slope {slope * 1024:+.1f} KiB per "
          f"update after update {first[0]}); {args.updates} updates in {seconds:.0f} s; log and "
          f"checkpoints {'consistent' if not problems else 'INCONSISTENT: ' + '; '.join(problems)}")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
