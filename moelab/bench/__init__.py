"""Speed work, outside moelab's core path: `moelab bench` and what it compares against.

- reference.py: the fairseq-style reference step (experts one at a time, manual attention,
  the full float32 log-softmax) that moelab's training step is timed against;
- techniques.py: each of moelab's speed-ups timed on its own (the `techniques` entry);
- harness.py: presets, the benchmark's model and batch, timing, memory, FLOPs and MFU;
- runner.py: `moelab bench` itself, its arguments and its one JSON line.

Nothing in moelab.train, moelab.model, moelab.eval.lm or moelab.generate imports this package
(tests/test_bench.py checks it).
"""

from moelab.bench.harness import BenchConfig
from moelab.bench.runner import (
    add_bench_arguments,
    main,
    measure_eval_and_sample,
    measure_training,
    run_bench,
    run_benchmark,
)

__all__ = ["BenchConfig", "add_bench_arguments", "main",
           "measure_eval_and_sample", "measure_training", "run_bench", "run_benchmark"]
