"""`moelab demo`: the whole study on the bundled corpus in one command (moelab/demo.py)."""

from __future__ import annotations

import argparse

from moelab.cli.flags import add_config_arguments, config_kwargs
from moelab.demo import DemoConfig, demo
from moelab.workbench import TRAIN_PRESETS

HELP = ("the whole study on the bundled corpus: train dense and the four methods, evaluate, "
        "compare, sample, report")


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


FLAGS = {
    "out": dict(help="report folder; also holds the data-bin and the runs, so a second run "
                     "skips finished work", metavar="DIR"),
    "preset": dict(help="cpu: a small model, about 15 minutes on 2 cores; gpu: the seed's "
                        "transformer_lm with K = 10; smoke: seconds, for tests; auto: gpu when "
                        "CUDA is available, else cpu", choices=["auto", *TRAIN_PRESETS]),
    "methods": dict(help="comma-separated methods to run", parse=_comma_list, metavar="M,M"),
    "num_experts": dict(help="K for the mixture methods (default: 7 on cpu, 10 on gpu)"),
    "seed": dict(help="sampling seed"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig, specs=FLAGS)


def run(args: argparse.Namespace) -> int:
    path = demo(DemoConfig(**config_kwargs(args, DemoConfig)))
    print(f"moelab demo: done; read {path}")
    return 0
