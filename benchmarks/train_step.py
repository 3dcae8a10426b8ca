"""Training-step speed of every method vs the fairseq-style reference: `moelab bench` per method.

The reference, the timing and the per-technique ratios live in moelab/bench/ (`moelab bench`);
this script only loops over the methods and prints one JSON line each:

    python benchmarks/train_step.py                      # tiny preset, CPU
    python benchmarks/train_step.py --preset fairseq --device cuda
"""

from __future__ import annotations

import argparse
import json

from moelab.bench import BenchConfig, run_benchmark
from moelab.presets import BENCHMARKS
from moelab.train.method import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default=None, choices=tuple(BENCHMARKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--techniques", action="store_true", help="also time each technique")
    args = parser.parse_args()
    for method in args.methods:
        config = BenchConfig(preset=args.preset, method=method, steps=args.steps,
                             device=args.device, techniques=args.techniques, eval_sample=False)
        print(json.dumps(run_benchmark(config)), flush=True)


if __name__ == "__main__":
    main()
