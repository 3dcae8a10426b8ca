"""`moelab train DATA_BIN ...`: fairseq's `fairseq-train` command; its Python twin is `train(...)`.

The flags are generated from the config dataclasses (moelab/train/config.py), so
`moelab train data-bin --warmup-updates 100` and `train("data-bin", warmup_updates=100)` mean the
same thing and share defaults. The fairseq-only flags of the original workflow's command are
accepted and explained in one line each.
"""

from __future__ import annotations

import argparse
import os
import sys

from moelab.cli.flags import add_config_arguments, config_kwargs
from moelab.errors import MoelabError
from moelab.train.command import train
from moelab.train.config import CONFIG_CLASSES, RunConfig

# fairseq flags that configure fairseq itself: accepted, explained, otherwise ignored.
_FAIRSEQ_ONLY = {
    "ddp_backend": "moelab uses torch DistributedDataParallel (launch with `torchrun "
                   "--nproc-per-node N -m moelab train ...`); --ddp-backend={} is ignored",
    "task": "the language_model_moe task is built into `moelab train`; --task is not needed",
    "user_dir": "moelab's MoE task and model are part of the package; --user-dir {} is ignored",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`lr` -> `--lr`), with the dataclass default."""
    for group_name, cls in CONFIG_CLASSES.items():
        add_config_arguments(parser, cls, group=parser.add_argument_group(f"{group_name} options"))
    compat = parser.add_argument_group("fairseq compatibility (accepted and explained)")
    compat.add_argument("--ddp-backend", default=None, help="ignored: moelab uses torch DDP")
    compat.add_argument("--task", default=None, help="only language_model_moe")
    compat.add_argument("--user-dir", default=None, help="ignored: the MoE code is built in")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """argparse Namespace -> RunConfig; invalid values become one-line MoelabErrors."""
    try:
        return RunConfig(**{group: cls(**config_kwargs(args, cls))
                            for group, cls in CONFIG_CLASSES.items()})
    except ValueError as e:
        raise MoelabError(str(e)) from None


def fairseq_notes(args: argparse.Namespace) -> list[str]:
    """One line per fairseq-only flag given; a --task other than language_model_moe is an error."""
    task = getattr(args, "task", None)
    if task not in (None, "language_model_moe"):
        raise MoelabError(f"--task {task} is not supported: `moelab train` trains the "
                          "language_model_moe task (drop --task)")
    notes = []
    for name, text in _FAIRSEQ_ONLY.items():
        value = getattr(args, name, None)
        if value is not None:
            notes.append(f"moelab train: note: {text.format(value)}")
    return notes


def run(args: argparse.Namespace) -> int:
    notes = fairseq_notes(args)
    config = config_from_args(args)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(note, file=sys.stderr)
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0 and result.valid is not None:
        v = result.valid
        nmi = "" if v.nmi is None else f", NMI with domains {v.nmi:.3f}"
        print(f"moelab train: done at update {result.num_updates}: valid loss {v.loss:.4f} "
              f"(ppl {v.ppl:.2f}){nmi}; checkpoints and train_log.jsonl in {result.save_dir}",
              file=sys.stderr)
    return 0
