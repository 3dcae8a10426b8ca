"""How a run stops without losing anything: a SIGTERM/SIGINT saves first, a non-finite
update is skipped (and too many in a row stop the run), running out of memory is a message."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelab.errors import MoelabError
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig
from moelab.train.state import TrainState
from moelab.train.update import StepStats


class TrainingInterrupted(MoelabError):
    """SIGTERM or SIGINT stopped training after saving checkpoint_last (a pre-emption)."""

    def __init__(self, signal_name: str, num_updates: int, save_dir: Path):
        self.exit_code = 128 + getattr(signal, signal_name)  # the shell's convention: 143, 130
        super().__init__(
            f"{signal_name} received: stopped after update {num_updates} and saved "
            f"{save_dir / ckpt.LAST}; run the same command again to resume from there")


class StopSignals:
    """SIGTERM and SIGINT (how clusters pre-empt, and Ctrl-C) ask training to stop at the next
    update boundary, after saving, instead of killing it mid-update. A second signal stops at
    once. Outside the main thread (where Python cannot take signals) it does nothing."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if self.requested:  # the second one: no waiting for the update to finish
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        tqdm.write(f"moelab train: {self.signal_name} received: saving checkpoint_last after "
                   "this update, then stopping (send it again to stop at once)", file=sys.stderr)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingDiverged(MoelabError):
    """Too many updates in a row had a non-finite loss or gradient (--max-bad-updates)."""


def skip_update(stats: StepStats, state: TrainState, config: RunConfig,
                say: Callable[[str], None]) -> None:
    """Count an update dropped for a NaN/inf loss or gradient; stop after too many in a row.

    The data it used is consumed (a resumed run skips it identically) but it is not counted as
    an update: the schedule and the log go on from the last good one, as fairseq does on overflow.
    """
    state.skipped_updates += 1
    state.bad_in_row += 1
    update = state.num_updates + 1
    limit = config.train.max_bad_updates
    what = f"loss {float(stats.loss):.4g}, gradient norm {float(stats.grad_norm):.4g}"
    if state.bad_in_row >= limit:
        raise TrainingDiverged(
            f"stopped at update {update}: its loss or gradient was not finite ({what}) on "
            f"{state.bad_in_row} batches in a row (--max-bad-updates {limit}); none of them "
            f"changed the weights, and the last checkpoint in {config.train.save_dir} holds "
            "finite weights. Lower --lr, raise --warmup-updates or set --clip-norm, then rerun "
            "to resume from it")
    say(f"update {update} skipped, not finite ({what}): no optimizer step taken "
        f"({state.bad_in_row} in a row, {state.skipped_updates} in all)")


@contextlib.contextmanager
def out_of_memory_is_an_error(state: TrainState, config: RunConfig):
    """Running out of memory becomes a message with what to change, not a traceback."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not (isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e)):
            raise
        d = config.data
        raise MoelabError(
            f"out of memory at update {state.num_updates + 1} (batches of up to --max-tokens "
            f"{d.max_tokens} tokens, --tokens-per-sample {d.tokens_per_sample}): lower "
            "--max-tokens (raise --update-freq to keep the same batch size) or use a smaller "
            f"model; the checkpoints in {config.train.save_dir} are intact, rerun to resume"
        ) from None
