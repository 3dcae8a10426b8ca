"""`moelab train DATA_BIN ...` and its Python twin `train(...)`.

The flags are generated from the config dataclasses (moelab/train/config.py), so
`moelab train data-bin --warmup-updates 100` and `train("data-bin", warmup_updates=100)` mean the
same thing and share defaults. The fairseq-only flags of the seed command are accepted and
explained in one line each.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from moelab.errors import MoelabError
from moelab.train.config import CONFIG_CLASSES, RunConfig
from moelab.train.distributed import setup_distributed, teardown_distributed
from moelab.train.trainer import Callback, TrainResult, fit

# fairseq flags that configure fairseq itself: accepted, explained, otherwise ignored.
_FAIRSEQ_ONLY = {
    "ddp_backend": "moelab uses torch DistributedDataParallel (launch with `torchrun "
                   "--nproc-per-node N -m moelab train ...`); --ddp-backend={} is ignored",
    "task": "the language_model_moe task is built into `moelab train`; --task is not needed",
    "user_dir": "moelab's MoE task and model are part of the package; --user-dir {} is ignored",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`lr` -> `--lr`), with the dataclass default."""
    for group_name, cls in CONFIG_CLASSES.items():
        group = parser.add_argument_group(f"{group_name} options")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            _add_field(parser if "positional" in f.metadata else group, f, hints[f.name])
    compat = parser.add_argument_group("fairseq compatibility (accepted and explained)")
    compat.add_argument("--ddp-backend", default=None, help="ignored: moelab uses torch DDP")
    compat.add_argument("--task", default=None, help="only language_model_moe")
    compat.add_argument("--user-dir", default=None, help="ignored: the MoE code is built in")


def _add_field(parser, f, hint) -> None:
    meta = f.metadata
    if "positional" in meta:
        parser.add_argument(f.name, metavar=meta["positional"], help=meta["help"])
        return
    default = f.default_factory() if f.default is MISSING else f.default
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    names = (flag, *meta.get("aliases", ()))
    kind = _base_type(hint)
    shown = default is not None and default is not False
    help_text = meta["help"] + (" (default: %(default)s)" if shown else "")
    if kind is bool:
        if meta.get("negatable"):
            action = argparse.BooleanOptionalAction
        else:  # a flag that flips the default: --mean-pool-gating-network, --no-progress-bar
            action = "store_false" if default is True else "store_true"
        parser.add_argument(*names, dest=f.name, action=action, default=default, help=meta["help"])
        return
    parser.add_argument(*names, dest=f.name, type=meta.get("parse", kind), default=default,
                        choices=meta.get("choices"), help=help_text,
                        metavar=None if "choices" in meta else _METAVARS.get(kind, "VALUE"))


_METAVARS = {int: "N", float: "X", str: "STR"}


def _base_type(hint):
    """`int | None` -> int; tuple[...] -> str (parsed by the field's own `parse`)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return str if typing.get_origin(hint) is tuple else hint


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """argparse Namespace -> RunConfig; invalid values become one-line MoelabErrors."""
    try:
        return RunConfig(**{
            group: cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
            for group, cls in CONFIG_CLASSES.items()
        })
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


def run_train(args: argparse.Namespace) -> int:
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


def train(config: RunConfig | str | Path, *, on_log: Callback | None = None,
          on_eval: Callback | None = None, **options) -> TrainResult:
    """Train from Python: `train("data-bin/mix", method="hMoEup", num_experts=3, max_update=500)`.

    `config` is a RunConfig or the data-bin folder; `options` are the flag names with
    underscores and override the config's values. `on_log(record)` / `on_eval(record)` receive
    each train / valid log line (dicts) as it is written, for live plots. Under torchrun the
    process group is set up and torn down here.
    """
    if isinstance(config, RunConfig):
        if options:
            flat = {k: v for group in config.to_dict().values() for k, v in group.items()}
            config = RunConfig.from_kwargs(**{**flat, **options})
    else:
        config = RunConfig.from_kwargs(str(config), **options)
    try:
        dist = setup_distributed(config.train.device)
    except ValueError as e:  # a device this machine does not have
        raise MoelabError(str(e)) from None
    try:
        return fit(config, dist, on_log=on_log, on_eval=on_eval)
    finally:
        teardown_distributed(dist)
