"""Speed of `eval-lm` scoring and of sampling with and without the KV cache, in one run.

The measurement lives in moelab/bench/runner.py (`measure_eval_and_sample`, part of `moelab bench`):

    python benchmarks/eval_and_sample.py [--preset tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import json

import torch

from moelab.bench import BenchConfig, measure_eval_and_sample
from moelab.presets import BENCHMARKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default=None, choices=tuple(BENCHMARKS))
    parser.add_argument("--num-experts", type=int, default=None)
    args = parser.parse_args()
    config = BenchConfig(preset=args.preset, device=args.device, num_experts=args.num_experts)
    figures = measure_eval_and_sample(config, BENCHMARKS[config.preset],
                                      torch.device(config.device))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
