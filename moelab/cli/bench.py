"""`moelab bench`: speed against a fairseq-style reference; the flags live beside the benchmark."""

from __future__ import annotations

from moelab.bench import add_bench_arguments as add_arguments
from moelab.bench import run_bench as run

__all__ = ["add_arguments", "run"]
