"""`moelab bench`: speed against a fairseq-style reference; the flags live beside the benchmark."""

from __future__ import annotations

from moelab.bench import add_bench_arguments as add_arguments
from moelab.bench import run_bench as run

HELP = "training/eval-lm/sampling speed vs a fairseq-style reference (one JSON line)"

__all__ = ["HELP", "add_arguments", "run"]
