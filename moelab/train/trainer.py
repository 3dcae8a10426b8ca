"""The training loop: a `Trainer` holds one run's state, and its methods are the loop's steps.

`fit` builds the data, model and optimizer, resumes from a checkpoint when the save dir has one,
then repeats: take `update_freq` batches, one EM update, log, validate, save. It knows nothing
about notebooks or the command line: callers pass `on_log` / `on_eval` callbacks and get a
TrainResult back, whose `.run` is the trained Run (moelab.train.run). Only rank 0 writes logs
and checkpoints.

Faults (a run killed at any instant, a full disk, a NaN) never cost more than the updates since
the last checkpoint, and never leave a misleading file: checkpoints are written crash-safely
(checkpoint.py) and hold everything needed to continue bit-exactly, log meter included; the log is
cut back to the checkpoint on resume; an update whose loss or gradient is not finite is skipped
(no optimizer step) and counted, and too many in a row stop the run before NaN reaches the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from moelab.data import Batch, BinarizedDataset, TrainBatches
from moelab.errors import MoelabError
from moelab.evaluate import CONFIDENCE_KEYS, posterior_confidence, start_log_prior, summarize
from moelab.model import MixtureLM, ModelConfig
from moelab.train import checkpoint as ckpt
from moelab.train import faults
from moelab.train.config import RunConfig, model_config
from moelab.train.distributed import DistInfo, all_reduce_sum, gather_objects
from moelab.train.history import LOG_FILE, append_record, read_history, truncate_history
from moelab.train.objectives import ExpertScorer, em_loss, method_flags
from moelab.train.prefetch import BatchPrefetcher
from moelab.train.run import (
    Run,
    TrainState,
    build_checkpoint,
    check_resumable,
    restore_training,
)
from moelab.train.schedule import below_min_lr, learning_rate

Callback = Callable[[dict], None]


@dataclass
class ValidResult:
    loss: float  # objective per target token (marginal NLL for soft EM), nats
    nll: float  # -log p(x | z*) per token (hard) / marginal (soft)
    ppl: float  # exp(loss)
    num_tokens: int
    posterior: np.ndarray  # (documents, K) p(z | whole document), prior at the document start
    domain_ids: np.ndarray  # (documents,)
    nmi: float | None  # argmax posterior vs domain labels; None with fewer than 2 domains
    # how sure that clustering is (moelab.evaluate.posterior_confidence): read beside the NMI
    confidence: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    model: MixtureLM
    model_config: ModelConfig
    config: RunConfig
    num_updates: int
    valid: ValidResult | None
    save_dir: Path
    history: pd.DataFrame | None = field(default=None, repr=False)  # rank 0 only

    @property
    def run(self) -> Run:
        """The trained model as a Run (its last checkpoint's weights, already in memory)."""
        return Run(save_dir=self.save_dir, model=self.model, model_config=self.model_config,
                   config=self.config, checkpoint_path=self.save_dir / ckpt.LAST,
                   num_updates=self.num_updates, history=self.history)


def fit(config: RunConfig, dist: DistInfo, *, on_log: Callback | None = None,
        on_eval: Callback | None = None) -> TrainResult:
    return Trainer(config, dist, on_log=on_log, on_eval=on_eval).fit()


class Trainer:
    """One training run: its data, model, optimizer, meter and position (`state`), and the
    steps of the loop as methods, so that each step reads what it needs from `self`."""

    def __init__(self, config: RunConfig, dist: DistInfo, *, on_log: Callback | None = None,
                 on_eval: Callback | None = None):
        self.started = time.perf_counter()
        # the precision actually used goes into the config, so every checkpoint and report
        # says it
        self.config = config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, precision=resolve_precision(config.train.precision, dist.device)))
        self.dist, self.on_log, self.on_eval = dist, on_log, on_eval
        set_seed(config.train.seed)
        self.say = _printer(dist)
        self.hard, self.uniform_prior = method_flags(config.model.method)
        if self.uniform_prior and config.model.mean_pool_gating_network:
            self.say(f"note: --mean-pool-gating-network is unused with --method "
                     f"{config.model.method}: the uniform prior p(z) = 1/K needs no gating "
                     "network, so none is built")
        self.train_ds = BinarizedDataset(config.data.data, "train")
        self.valid = valid_batches(BinarizedDataset(config.data.data, "valid"), config)
        ds = self.train_ds
        try:
            self.model_config = model_config(
                config.model, vocab_size=ds.vocab_size, pad_id=ds.pad_id,
                tokens_per_sample=config.data.tokens_per_sample,
                input_only_ids=(ds.unk_id, ds.bos_id, ds.pad_id))
        except ValueError as e:
            raise MoelabError(f"cannot build the model: {e}") from None
        self.model = MixtureLM(self.model_config).to(dist.device)
        self.optimizer = build_optimizer(self.model, config, dist.device)
        self.meter = Meter(self.model_config.num_experts, dist.device)
        self.state = TrainState()
        self.save_dir = Path(config.train.save_dir)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        config, dist = self.config, self.dist
        restore = self.resume()
        state = self.state  # restored by resume()
        if config.train.compile:
            self.model.compile_for_speed()  # warns and stays eager if compiling fails
        step_module = wrap_for_training(self.model, dist, hard=self.hard,
                                        uniform_prior=self.uniform_prior,
                                        estep_tokens=config.train.estep_tokens,
                                        estep_dtype=config.train.estep_torch_dtype)
        batches = train_batches(self.train_ds, config, dist)
        autocast = autocast_context(dist.device, config.train.precision)
        progress = tqdm(total=config.train.max_update or None, initial=state.num_updates,
                        unit="update", disable=not (dist.is_main and config.train.progress_bar),
                        dynamic_ncols=True)
        updates_at_start = state.num_updates
        prefetcher = BatchPrefetcher(batches, update_freq=config.train.update_freq,
                                     max_epoch=config.train.max_epoch,
                                     pin_memory=dist.device.type == "cuda",
                                     enabled=config.train.prefetch)
        self.meter.start_clock(self.meter.elapsed_before)  # setup time is not training time
        stop_now = False  # a signal reached some rank: stop at this update boundary
        with out_of_memory_is_an_error(state, config), prefetcher, StopSignals() as stop:
            while not finished(state, config):
                if stop_now:
                    self.save(ckpt.LAST)
                    progress.close()
                    raise TrainingInterrupted(stop.signal_name or "SIGTERM", state.num_updates,
                                              self.save_dir)
                micro_batches = prefetcher.take(state)
                if not micro_batches:
                    break
                lr = set_learning_rate(self.optimizer, config, state.num_updates)
                stats = train_step(step_module, micro_batches, self.optimizer, dist=dist,
                                   clip_norm=config.optim.clip_norm, autocast=autocast,
                                   stop_requested=stop.requested)
                stop_now = stats.stop
                if stats.skipped:
                    skip_update(stats, state, config, self.say)
                    continue
                state.bad_in_row = 0
                state.num_updates += 1
                self.meter.add(stats)
                progress.update(1)
                if state.num_updates % config.train.log_interval == 0:
                    record = self.log_train(lr)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                    if self.on_log is not None and dist.is_main:
                        self.on_log(record)
                if finished(state, config):
                    break  # the final validation and save follow the loop
                if _due(state, config.train.validate_interval_updates):
                    self.validate_and_save()
                elif _due(state, config.train.save_interval_updates):
                    self.save(ckpt.LAST)
            progress.close()
            if below_min_lr(config.optim, state.num_updates):
                self.say(f"stopped at update {state.num_updates}: the learning rate "
                         f"{learning_rate(config.optim, state.num_updates):.3g} is at or below "
                         f"--min-lr {config.optim.min_lr:g} (fairseq's rule)")
            if state.num_updates > updates_at_start or restore is None:
                result = self.validate_and_save()
            else:  # the checkpoint was already finished: report, but write nothing new
                result = validate(self.model, self.valid, dist, hard=self.hard)
        self.model.eval()
        # a finished checkpoint restored into a new --save-dir trains nothing and logs nothing
        logged = dist.is_main and (self.save_dir / LOG_FILE).is_file()
        return TrainResult(model=self.model, model_config=self.model_config, config=config,
                           num_updates=state.num_updates, valid=result, save_dir=self.save_dir,
                           history=read_history(self.save_dir) if logged else None)

    def elapsed(self) -> float:
        """Seconds spent training, over this process and the runs it resumed."""
        return self.state.wall_time + time.perf_counter() - self.started

    # ------------------------------------------------------------------ validation
    def validate_and_save(self) -> ValidResult:
        """Validate, log a `valid` line, save checkpoint_last (and checkpoint_best if improved)."""
        state, dist = self.state, self.dist
        result = validate(self.model, self.valid, dist, hard=self.hard)
        counts = np.bincount(result.posterior.argmax(1),
                             minlength=self.model_config.num_experts)
        record = {
            "kind": "valid", "update": state.num_updates, "epoch": state.epoch,
            "loss": result.loss, "nll": result.nll, "ppl": result.ppl,
            "num_tokens": result.num_tokens,
            "posterior_mass": result.posterior.mean(0).tolist(),
            "usage_entropy": _entropy(torch.from_numpy(counts / counts.sum())),
            "nmi": result.nmi,
            **result.confidence,
            "skipped_updates": state.skipped_updates,
            "wall": self.elapsed(),
        }
        improved = result.loss < state.best_valid_loss
        if improved:
            state.best_valid_loss = result.loss
        if dist.is_main:
            _log_io(self.save_dir, append_record, record)
            nmi = "" if result.nmi is None else (
                f" | nmi {result.nmi:.3f} (mean max posterior "
                f"{result.confidence['mean_max_posterior']:.2f})")
            self.say(f"valid | update {state.num_updates} | loss {result.loss:.4f} | "
                     f"ppl {result.ppl:.2f}{nmi}")
        # best before last: checkpoint_last is the commit point of a resume, so a kill between
        # the two rewrites checkpoint_best identically on the rerun instead of losing it
        self.save(ckpt.BEST if improved else None, ckpt.LAST)
        if self.on_eval is not None and dist.is_main:
            self.on_eval(record)
        return result

    # ------------------------------------------------------------------ logging
    def log_train(self, lr: float) -> dict:
        """Reduce the interval's sums over ranks into one log line (written by rank 0)."""
        meter, state = self.meter, self.state
        K = meter.num_experts
        sums = all_reduce_sum(meter.sums.clone(), self.dist).cpu()
        grad_norm_sum = float(meter.sums[4])  # identical on every rank (gradients all-reduced)
        loss = float(sums[0] / sums[2])  # finite: skipped updates never reach the meter
        elapsed = time.perf_counter() - meter.since
        usage = sums[5 + K :] / sums[5 + K :].sum()
        record = {
            "kind": "train", "update": state.num_updates, "epoch": state.epoch,
            "loss": loss, "nll": float(sums[1] / sums[2]), "ppl": _ppl(loss), "lr": lr,
            "grad_norm": grad_norm_sum / meter.updates,
            "tokens_per_s": meter.global_tokens / max(elapsed, 1e-9),
            "posterior_mass": (sums[5 : 5 + K] / sums[3]).tolist(),
            "usage_entropy": _entropy(usage),
            "skipped_updates": state.skipped_updates,
            "wall": self.elapsed(),
        }
        if self.dist.is_main:
            _log_io(self.save_dir, append_record, record)
        meter.reset()
        return record

    # ------------------------------------------------------------------ checkpoints
    def save(self, *names: str | None) -> None:
        """Every rank contributes its RNG state and meter (a collective); rank 0 writes the files.

        checkpoint_last keeps its predecessor as checkpoint_last.prev.pt. Weights that are not
        finite are never written: the run stops instead, leaving the last good checkpoint.
        """
        state = self.state
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise TrainingDiverged(
                f"the weights at update {state.num_updates} are not finite (nan/inf), so no "
                f"checkpoint was written; the last one in {self.save_dir} is good. Lower "
                "--lr, raise --warmup-updates or set --clip-norm, then rerun to resume from it")
        per_rank = gather_objects((ckpt.rng_state(), self.meter.state_dict()), self.dist)
        if not self.dist.is_main:
            return
        checkpoint = build_checkpoint(
            model=self.model, optimizer=self.optimizer, state=state, config=self.config,
            model_config=self.model_config,
            tokenizer={"sha256": self.train_ds.meta.get("tokenizer_sha256"),
                       "vocab_size": self.train_ds.vocab_size},
            rng=[r for r, _ in per_rank], meters=[m for _, m in per_rank],
            world_size=self.dist.world_size, wall_time=self.elapsed())
        for name in names:
            if name is not None:
                ckpt.save_checkpoint(self.save_dir / name, checkpoint,
                                     keep_previous=name == ckpt.LAST)

    def resume(self) -> Path | None:
        """Prepare --save-dir and continue from its checkpoint, if any; -> the file resumed."""
        if self.dist.is_main:
            prepare_save_dir(self.save_dir, self.say)
        restore = find_restore_file(self.config, self.say)
        if restore is None and self.dist.is_main:
            refuse_earlier_run(self.save_dir)
        if restore is not None:
            restore = self.restore_with_fallback(restore)
            self.say(f"resumed from {restore} at update {self.state.num_updates} "
                     f"(epoch {self.state.epoch})")
        if self.dist.is_main:
            _log_io(self.save_dir, truncate_history, self.state.num_updates)
        return restore

    def restore_with_fallback(self, path: Path) -> Path:
        """restore, falling back to the previous checkpoint if this one is damaged; -> the file
        restored.

        Only an unreadable file falls back; one that does not fit this run (another K,
        vocabulary or architecture) is an error, since its predecessor would not fit either.
        """
        try:
            self.restore(path)
            return path
        except ckpt.UnreadableCheckpoint as e:
            prev = ckpt.previous_path(path)
            if not prev.is_file() or prev == path:
                raise
            self.restore(prev)
            # set the damaged file aside, or the next save would keep it as the "previous" one
            aside = path.with_name(path.name + ".damaged")
            if self.dist.is_main and path.is_file():
                os.replace(path, aside)
            self.say(f"warning: {e}")
            self.say(f"warning: resuming from the previous checkpoint {prev} instead (the "
                     f"damaged file is now {aside.name}); the updates after it are trained again")
            return prev

    def restore(self, path: Path) -> None:
        """Weights, optimizer, RNG, meter and data position, so the run continues exactly."""
        checkpoint = ckpt.read_checkpoint(path, map_location=self.dist.device)
        check_resumable(checkpoint, self.model_config,
                        self.train_ds.meta.get("tokenizer_sha256"), path,
                        method=self.config.model.method)
        self.state, meter, note = restore_training(
            checkpoint, path, self.model, self.optimizer, rank=self.dist.rank,
            world_size=self.dist.world_size)
        if note is not None:
            self.say(f"note: {note}")
        if meter is not None:
            self.meter.load_state_dict(meter)


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


def _due(state: TrainState, interval: int) -> bool:
    return interval > 0 and state.num_updates % interval == 0


def finished(state: TrainState, config: RunConfig) -> bool:
    t = config.train
    return ((t.max_update > 0 and state.num_updates >= t.max_update)
            or (t.max_epoch > 0 and state.epoch > t.max_epoch)
            or below_min_lr(config.optim, state.num_updates))


# --------------------------------------------------------------------------- setup


def set_seed(seed: int) -> None:
    """The same seed on every rank: identical initial weights (DDP broadcasts them anyway)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, config: RunConfig, device: torch.device
                    ) -> torch.optim.AdamW:
    """fairseq's `adam`: its weight decay is decoupled (w -= lr * wd * w), which is AdamW's
    update, not torch's Adam (which adds wd * w to the gradient)."""
    o = config.optim
    # fused Adam is one kernel for all parameters on CUDA; CPU has no fused kernel here
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.adam_betas, eps=o.adam_eps,
                            weight_decay=o.weight_decay, fused=device.type == "cuda")


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto -> bfloat16 on CUDA (tensor cores, no loss scaling), float32 elsewhere."""
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return precision


def autocast_context(device: torch.device, precision: str = "auto"
                     ) -> Callable[[], contextlib.AbstractContextManager]:
    """The M-step's context: bf16 autocast for --precision bfloat16, else plain float32.

    The E-step and validation do not run under it: they take their own precision (em_loss's
    estep_dtype, float32 by default; validation float32, as eval-lm), whatever the device.
    """
    if resolve_precision(precision, device) == "bfloat16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_batches(ds: BinarizedDataset, config: RunConfig, dist: DistInfo) -> TrainBatches:
    d = config.data
    return TrainBatches(ds, tokens_per_sample=d.tokens_per_sample, max_tokens=_max_tokens(config),
                        seed=config.train.seed, max_sentences=d.max_sentences,
                        rank=dist.rank, world_size=dist.world_size)


def valid_batches(ds: BinarizedDataset, config: RunConfig) -> TrainBatches:
    """All valid chunks in a fixed order; `validate` deals them out to the ranks itself."""
    d = config.data
    return TrainBatches(ds, tokens_per_sample=d.tokens_per_sample, max_tokens=_max_tokens(config),
                        max_sentences=d.max_sentences, shuffle=False)


def _max_tokens(config: RunConfig) -> int:
    d = config.data
    return d.max_tokens if d.max_tokens is not None else d.max_sentences * d.tokens_per_sample


class EMStep(nn.Module):
    """Runs the whole EM step (E-step and M-step) as one forward, so DDP can wrap it.

    The E-step inside em_loss scores all experts under no_grad, so it adds nothing to the graph;
    the M-step's graph is the one DDP's reducer expects, and the gradient all-reduce happens in
    backward as usual. Returns a tuple so DDP finds the output tensors. The E-step options are
    checked once, here, by the ExpertScorer they build.
    """

    def __init__(self, model: MixtureLM, *, hard: bool, uniform_prior: bool,
                 estep_tokens: int | None = None, estep_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.hard, self.uniform_prior = hard, uniform_prior
        self.scorer = ExpertScorer(model, estep_tokens=estep_tokens, estep_dtype=estep_dtype)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = em_loss(self.model, batch, hard=self.hard, uniform_prior=self.uniform_prior,
                      scorer=self.scorer)
        return out.loss, out.responsibilities, out.nll


def wrap_for_training(model: MixtureLM, dist: DistInfo, *, hard: bool,
                      uniform_prior: bool, estep_tokens: int | None = None,
                      estep_dtype: torch.dtype | None = None) -> nn.Module:
    model.train()
    step = EMStep(model, hard=hard, uniform_prior=uniform_prior, estep_tokens=estep_tokens,
                  estep_dtype=estep_dtype)
    if not dist.distributed:
        return step
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    # Every parameter gets a gradient each step (a uniform prior builds no gating network), so
    # the reducer needs no unused-parameter search.
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=False)


def prepare_save_dir(save_dir: Path, say: Callable[[str], None]) -> None:
    """Create --save-dir (a clear error if we cannot) and clear what a killed run left there."""
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        probe = save_dir / f".moelab-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MoelabError(f"cannot write to --save-dir {save_dir}: {e.strerror or e}; choose "
                          "another --save-dir or fix its permissions") from None
    stale = ckpt.remove_stale_temporaries(save_dir)
    if stale:
        say(f"removed {len(stale)} unfinished checkpoint file(s) left by a run that was "
            f"killed while saving (the finished checkpoints are untouched)")


def refuse_earlier_run(save_dir: Path) -> None:
    """A save dir with an earlier run's best checkpoint or log, but no checkpoint_last to resume
    from, is not ours to overwrite: starting there would replace those files."""
    found = [name for name in (ckpt.BEST, LOG_FILE) if (save_dir / name).is_file()]
    if found:
        raise MoelabError(
            f"--save-dir {save_dir} holds {' and '.join(found)} from an earlier run but no "
            f"{ckpt.LAST} to resume from; starting a new run there would overwrite them. Use "
            "another --save-dir, or move those files away to start over in this one")


def find_restore_file(config: RunConfig, say: Callable[[str], None] | None = None
                      ) -> Path | None:
    """fairseq's rule: --restore-file (default checkpoint_last.pt) is looked up in --save-dir.

    When checkpoint_last.pt is missing but checkpoint_last.prev.pt exists (a run killed between
    the two renames of a save on a filesystem without hard links), the latter is used.
    """
    t = config.train
    given = Path(t.restore_file)
    candidates = [given] if given.is_absolute() else [Path(t.save_dir) / given, given]
    for path in candidates:
        if path.is_file():
            return path
    for path in candidates:
        if ckpt.previous_path(path).is_file():
            if say is not None:
                say(f"note: {path} is missing but {ckpt.previous_path(path)} (the checkpoint "
                    "before it) is there: resuming from it")
            return ckpt.previous_path(path)
    if t.restore_file != "checkpoint_last.pt":
        raise ckpt.CheckpointError(f"--restore-file {t.restore_file} not found (looked in "
                                   f"{', '.join(str(c) for c in candidates)})")
    return None


# --------------------------------------------------------------------------- one update


def set_learning_rate(optimizer: torch.optim.Optimizer, config: RunConfig,
                      num_updates: int) -> float:
    lr = learning_rate(config.optim, num_updates)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class StepStats:
    loss: torch.Tensor  # summed over tokens (all micro-batches, this rank)
    nll: torch.Tensor
    num_tokens: int  # this rank's targets
    global_tokens: int  # all ranks' targets in the update
    responsibility_sum: torch.Tensor  # (K,) summed over chunks
    argmax_counts: torch.Tensor  # (K,)
    num_chunks: int
    grad_norm: torch.Tensor  # before clipping
    skipped: bool = False  # the loss or gradient was not finite: no optimizer step was taken
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT): all stop after this one


def train_step(step_module: nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer,
               *, dist: DistInfo, clip_norm: float, autocast,
               stop_requested: bool = False) -> StepStats:
    """One optimizer update over `update_freq` micro-batches, normalized as fairseq does.

    Each micro-batch backpropagates its SUMMED loss scaled by 1 / (targets in the whole update,
    over all ranks), so the gradient is that of the mean per-token loss of the update, however it
    is split into micro-batches or ranks. DDP averages over ranks, hence the world_size factor.

    A non-finite loss or gradient norm (on any rank) skips the optimizer step and drops the
    gradients, so NaN never reaches the weights or Adam's moments. Deciding that costs one
    device sync per update, before the optimizer step; the same all-reduce tells every rank
    whether any was asked to stop (`stop_requested`), so all stop at the same update.
    """
    device = dist.device
    tokens = [b.num_tokens for b in micro_batches]  # counted on CPU: no device sync
    global_tokens = int(all_reduce_sum(torch.tensor([sum(tokens)], device=device), dist).item()
                        ) if dist.distributed else sum(tokens)
    scale = dist.world_size / global_tokens
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    r_sum, counts, chunks = None, None, 0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        last = i == len(micro_batches) - 1
        # gradients are all-reduced once per update: skip DDP's sync on all but the last
        sync = contextlib.nullcontext() if last or not dist.distributed else step_module.no_sync()
        with sync:
            with autocast():
                loss, r, nll = step_module(batch)
            (loss * scale).backward()
        loss_sum += loss.detach().float()
        nll_sum += nll.float()
        r_sum = r.sum(0) if r_sum is None else r_sum + r.sum(0)  # (K,)
        won = torch.bincount(r.argmax(-1), minlength=r.shape[1])  # (K,)
        counts = won if counts is None else counts + won
        chunks += r.shape[0]
    params = [p for p in optimizer.param_groups[0]["params"] if p.grad is not None]
    max_norm = clip_norm if clip_norm > 0 else math.inf  # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
    flags = torch.stack([bad, torch.tensor(float(stop_requested), device=device)])  # (2,)
    bad_anywhere, stop_anywhere = all_reduce_sum(flags, dist).tolist()  # the one sync
    skipped = bad_anywhere > 0  # the same decision on every rank
    faults.hit("step")
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return StepStats(loss=loss_sum, nll=nll_sum, num_tokens=sum(tokens),
                     global_tokens=global_tokens, responsibility_sum=r_sum,
                     argmax_counts=counts, num_chunks=chunks, grad_norm=grad_norm.detach(),
                     skipped=skipped, stop=stop_anywhere > 0)


# --------------------------------------------------------------------------- logging


class Meter:
    """Sums over one log interval, kept on the device: logging adds no wait for the GPU (the
    NaN check in train_step is the one sync per update)."""

    def __init__(self, num_experts: int, device: torch.device):
        self.num_experts, self.device = num_experts, device
        self.elapsed_before = 0.0  # seconds a restored interval had run before the checkpoint
        self.reset()

    def reset(self) -> None:
        K = self.num_experts
        # loss, nll, tokens, chunks, grad_norm sum, r_sum (K), argmax counts (K)
        self.sums = torch.zeros(5 + 2 * K, dtype=torch.float64, device=self.device)
        self.updates = 0
        self.global_tokens = 0
        self.since = time.perf_counter()  # when this interval's clock started

    def start_clock(self, elapsed: float = 0.0) -> None:
        """Time the interval from now, counting `elapsed` seconds already spent on its sums."""
        self.since = time.perf_counter() - elapsed

    def add(self, s: StepStats) -> None:
        K = self.num_experts
        self.sums[0] += s.loss.double()
        self.sums[1] += s.nll.double()
        self.sums[2] += s.num_tokens
        self.sums[3] += s.num_chunks
        self.sums[4] += s.grad_norm.double()
        self.sums[5 : 5 + K] += s.responsibility_sum.double()
        self.sums[5 + K :] += s.argmax_counts.double()
        self.updates += 1
        self.global_tokens += s.global_tokens

    def state_dict(self) -> dict:
        """The current interval's sums and the seconds they took: a resumed run logs the same
        line as an unbroken one, and its tokens/s is not inflated by tokens counted before."""
        return {"sums": self.sums.cpu(), "updates": self.updates,
                "global_tokens": self.global_tokens,
                "elapsed": time.perf_counter() - self.since}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.updates, self.global_tokens = int(state["updates"]), int(state["global_tokens"])
        self.elapsed_before = float(state.get("elapsed", 0.0))


def _log_io(save_dir: Path, write: Callable, *args) -> None:
    """Write to train_log.jsonl; a full disk or lost permission is a message, not a traceback."""
    try:
        write(save_dir, *args)
    except OSError as e:
        raise MoelabError(f"could not write the training log {Path(save_dir) / 'train_log.jsonl'}"
                          f": {e.strerror or e}; fix that (free space, permissions) and rerun the "
                          "same command to resume from the last checkpoint") from None


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _printer(dist: DistInfo) -> Callable[[str], None]:
    def say(message: str) -> None:
        if dist.is_main:
            tqdm.write(f"moelab train: {message}", file=sys.stderr)
    return say


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: MixtureLM, batches: TrainBatches, dist: DistInfo, *,
             hard: bool) -> ValidResult:
    """Objective per token on the valid split, and each document's posterior over experts.

    Eval mode, no grad. The documents' scores (log p(x | z) summed over their chunks) and the
    prior at a document's start go through moelab.evaluate.summarize, as eval-lm's do, so the
    posterior, NMI and confidence logged here are eval-lm's at context window 0. Ranks take every
    world_size-th batch and the sums are all-reduced, so every rank returns the same result.
    """
    was_training = model.training
    model.eval()
    K, device, ds = model.num_experts, dist.device, batches.ds
    doc_ll = torch.zeros(len(ds), K, dtype=torch.float64, device=device)  # sum_chunks log p(x|z)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, nll, tokens
    for n, position in enumerate(range(dist.rank, batches.batches_per_epoch, dist.world_size)):
        if n == 1:
            faults.hit("valid")  # testing hook: a kill in the middle of validation
        batch = batches.batch(1, position).to(device)
        # float32 on every device, as eval-lm scores: checkpoint_best is chosen on that number
        ll = model.expert_log_likelihoods(batch.tokens, batch.lengths)  # (B, K)
        prior = model.log_prior(batch.context, batch.context_lengths)  # (B, K)
        scores = prior + ll  # (B, K)
        if hard:
            z = scores.argmax(-1, keepdim=True)  # (B, 1)
            loss, nll = -scores.gather(1, z).sum(), -ll.gather(1, z).sum()
        else:
            loss = nll = -torch.logsumexp(scores, dim=-1).sum()
        sums += torch.stack([loss.double(), nll.double(),
                             batch.lengths.sum().double()])
        doc_ll.index_add_(0, batch.doc_ids, ll.double())
    for t in (sums, doc_ll):
        all_reduce_sum(t, dist)
    model.train(was_training)
    sums = sums.cpu()
    tokens = np.diff(np.asarray(ds.offsets, dtype=np.int64))
    domain_ids = np.asarray(ds.domain_ids, dtype=np.int64)
    summary = summarize(doc_ll.cpu().numpy(), start_log_prior(model).numpy(), tokens, domain_ids,
                        list(ds.domains), tokens_per_sample=batches.tokens_per_sample,
                        context_window=0)
    clusters = summary.clusters
    if math.isnan(clusters["nmi"]):  # no two known domains: no NMI, but still a confidence
        nmi = None
        posterior = summary.posteriors.to_numpy()
        confidence = posterior_confidence(doc_ll.cpu().numpy(), np.log(posterior), tokens)
    else:
        nmi = float(clusters["nmi"])
        confidence = {key: float(clusters[key]) for key in CONFIDENCE_KEYS}
    loss = float(sums[0] / sums[2])
    return ValidResult(loss=loss, nll=float(sums[1] / sums[2]), ppl=_ppl(loss),
                       num_tokens=int(sums[2]), posterior=summary.posteriors.to_numpy(),
                       domain_ids=domain_ids, nmi=nmi, confidence=confidence)
