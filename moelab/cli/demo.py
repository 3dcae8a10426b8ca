"""`moelab demo`: the whole study on the bundled corpus in one command (moelab/demo.py)."""

from __future__ import annotations

import argparse

from moelab.cli.flags import add_config_arguments, config_kwargs
from moelab.demo import DemoConfig, demo
from moelab.workbench import TRAIN_PRESETS


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _seeds(value: str) -> list[int]:
    """`3` -> seeds 1, 2, 3; `1,4,7` -> those seeds (`5,` -> seed 5 alone)."""
    try:
        if "," not in value:
            return list(range(1, int(value) + 1))
        return [int(item) for item in _comma_list(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: a number of seeds (3 means 1,2,3) or seeds, comma-separated") from None


FLAGS = {
    "out": dict(help="report folder; also holds the data-bin and the runs, so a second run "
                     "skips finished work", metavar="DIR"),
    "preset": dict(help="cpu: a small model, about 12 minutes on 2 cores; gpu: fairseq's "
                        "transformer_lm with K = 10; smoke: seconds, for tests; auto: gpu when "
                        "CUDA is available, else cpu", choices=["auto", *TRAIN_PRESETS]),
    "methods": dict(help="comma-separated methods to run", parse=_comma_list, metavar="M,M"),
    "num_experts": dict(help="K for the mixture methods (default: 7 on cpu, 10 on gpu)"),
    "seed": dict(help="sampling seed"),
    "seeds": dict(help="training seeds: N for seeds 1..N, or a comma-separated list (5, for "
                       "seed 5 alone); each method trains once per seed and every table gives "
                       "the mean and standard deviation", parse=_seeds, metavar="N|S,S"),
    "attribution_samples": dict(help="samples per expert that a tf-idf domain classifier "
                                     "labels, to score whether each expert writes the domain "
                                     "it owns (0: skip)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig, specs=FLAGS)


def run(args: argparse.Namespace) -> int:
    path = demo(DemoConfig(**config_kwargs(args, DemoConfig)))
    print(f"moelab demo: done; read {path}")
    return 0
