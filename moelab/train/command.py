"""`train(...)`: training from Python, the twin of `moelab train DATA_BIN ...` (cli/train.py).

Both build the same RunConfig from the config dataclasses (moelab/train/config.py), so
`train("data-bin", warmup_updates=100)` and `moelab train data-bin --warmup-updates 100` mean the
same thing and share defaults.
"""

from __future__ import annotations

from pathlib import Path

from moelab.errors import MoelabError
from moelab.train.config import RunConfig
from moelab.train.distributed import setup_distributed, teardown_distributed
from moelab.train.trainer import Callback, TrainResult, fit


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
