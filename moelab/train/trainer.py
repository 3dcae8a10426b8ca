"""The training loop: a `Trainer` holds one run's state, and its methods are the loop's steps.

`fit` builds the data, model and optimizer, resumes from a checkpoint when the save dir has one,
then repeats: take `update_freq` batches, one EM update, log, validate, save. It knows nothing
about notebooks or the command line: callers pass `on_log` / `on_eval` callbacks and get a
TrainResult back, whose `.run` is the trained Run (moelab.train.run). Only rank 0 writes logs
and checkpoints. One update is moelab.train.update's `train_step`; validation is
moelab.train.validation's; the save dir's checks are moelab.train.save_dir's.

Faults (a run killed at any instant, a full disk, a NaN) never cost more than the updates since
the last checkpoint, and never leave a misleading file: checkpoints are written crash-safely
(checkpoint.py) and hold everything needed to continue bit-exactly, log meter included (each
stateful part saves and restores itself; moelab.train.state says what a checkpoint holds); the
log is cut back to the checkpoint on resume; an update whose loss or gradient is not finite is
skipped (no optimizer step) and counted, and too many in a row stop the run before NaN reaches the
weights (moelab.train.stopping).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from moelab.data import BinarizedDataset, TrainBatches
from moelab.errors import MoelabError
from moelab.model import MixtureLM, ModelConfig
from moelab.train import checkpoint as ckpt
from moelab.train.assignment import Assignment, PriorBias, build_assignment
from moelab.train.branch import branch_from_dense
from moelab.train.config import RunConfig, model_config
from moelab.train.distributed import DistInfo, all_reduce_sum, gather_objects
from moelab.train.history import LOG_FILE, append_record, read_history, truncate_history
from moelab.train.meter import Meter, TrainSums, entropy, perplexity
from moelab.train.method import Method
from moelab.train.prefetch import BatchPrefetcher
from moelab.train.run import Run
from moelab.train.save_dir import find_restore_file, prepare_save_dir, refuse_earlier_run
from moelab.train.schedule import below_min_lr, learning_rate
from moelab.train.state import (
    ProcessRNG,
    TrainState,
    build_checkpoint,
    check_resumable,
    read_complete,
    remedy_changes,
    restore_training,
)
from moelab.train.stopping import (
    StopSignals,
    TrainingDiverged,
    TrainingInterrupted,
    out_of_memory_is_an_error,
    skip_update,
)
from moelab.train.update import (
    autocast_context,
    build_optimizer,
    resolve_precision,
    set_learning_rate,
    train_step,
    wrap_for_training,
)
from moelab.train.validation import ValidResult, validate
from moelab.train.warm_start import WarmStart, load_or_cluster

Callback = Callable[[dict], None]


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
        self.method = Method.parse(config.model.method)
        if self.method.uniform_prior and config.model.mean_pool_gating_network:
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
        # the stateful parts a checkpoint holds besides model, optimizer and meter
        # (moelab.train.state): where training stands, the prior bias (with --prior-bias-rate,
        # or resumed from a run that had one) and this process's random generators
        self.state = TrainState()
        self.prior_bias: PriorBias | None = None
        self.rng = ProcessRNG()
        self.assignment: Assignment | None = None  # built by fit, after a resume
        self.reshaped = False  # set by fit: a remedy is on, so the log adds the model's posterior
        self.save_dir = Path(config.train.save_dir)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        config, dist = self.config, self.dist
        restore = self.resume()
        state = self.state  # restored by resume()
        warm_start = self.warm_start()
        if config.train.compile:
            self.model.compile_for_speed()  # warns and stays eager if compiling fails
        self.assignment = self.build_assignment()
        # a remedy reshapes the posterior trained on, so the log shows the model's own beside it
        # (a warm start's updates run no E-step, and after them the two are one)
        self.reshaped = self.assignment is not None
        step_module = wrap_for_training(self.model, dist, self.method,
                                        estep_tokens=config.train.estep_tokens,
                                        estep_dtype=config.train.estep_torch_dtype,
                                        assignment=self.assignment)
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
            while self.stop_reason() is None:
                if stop_now:
                    self.save(ckpt.LAST)
                    progress.close()
                    raise TrainingInterrupted(stop.signal_name or "SIGTERM", state.num_updates,
                                              self.save_dir)
                update_started = time.perf_counter()
                micro_batches = prefetcher.take(state)
                if not micro_batches:
                    break
                lr = set_learning_rate(self.optimizer, config, state.num_updates)
                if self.assignment is not None:
                    self.assignment.start_update(state.num_updates)
                # warm start: the clusters, not the E-step, choose this update's experts
                warm = warm_start is not None and warm_start.chooses(state.num_updates)
                stats = train_step(step_module, micro_batches, self.optimizer, dist=dist,
                                   clip_norm=config.optim.clip_norm, autocast=autocast,
                                   stop_requested=stop.requested,
                                   assign=warm_start.assignment if warm else None)
                stop_now = stats.stop
                flops_before = state.train_flops
                # a skipped update's compute was spent all the same
                state.train_flops += stats.flops.total
                state.train_seconds += time.perf_counter() - update_started
                if stats.skipped:
                    skip_update(stats, state, config, self.say)
                    continue
                state.bad_in_row = 0
                if self.assignment is not None and self.assignment.prior_bias is not None:
                    # the load: chunks won (hard EM) or posterior mass (soft EM), all ranks
                    load = stats.argmax_counts if self.method.hard else stats.responsibility_sum
                    self.assignment.prior_bias.update(load, dist)
                state.num_updates += 1
                self.meter.add(stats)
                progress.update(1)
                if state.num_updates % config.train.log_interval == 0:
                    record = self.log_train(lr)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                    if self.on_log is not None and dist.is_main:
                        self.on_log(record)
                if self.stop_reason() is not None:
                    break  # the final validation and save follow the loop
                if (_due(state, config.train.validate_interval_updates)
                        or _passed(flops_before, state.train_flops,
                                   config.train.validate_interval_flops)):
                    self.validate_and_save()
                elif _due(state, config.train.save_interval_updates):
                    self.save(ckpt.LAST)
            progress.close()
            reason = self.stop_reason()
            if reason is not None and not reason.startswith(("--max-update", "--max-epoch")):
                self.say(f"stopped at update {state.num_updates}: {reason}")
            if state.num_updates > updates_at_start or restore is None:
                result = self.validate_and_save()
            else:  # the checkpoint was already finished: report, but write nothing new
                result = validate(self.model, self.valid, dist, self.method)
        self.model.eval()
        # a finished checkpoint restored into a new --save-dir trains nothing and logs nothing
        logged = dist.is_main and (self.save_dir / LOG_FILE).is_file()
        return TrainResult(model=self.model, model_config=self.model_config, config=config,
                           num_updates=state.num_updates, valid=result, save_dir=self.save_dir,
                           history=read_history(self.save_dir) if logged else None)

    def build_assignment(self) -> Assignment | None:
        """The remedies against collapse, None when all are off; a new prior bias starts at 0,
        a resumed one where its checkpoint left it."""
        t = self.config.train
        if t.prior_bias_rate > 0 and self.prior_bias is None:
            self.prior_bias = PriorBias(
                torch.zeros(self.model_config.num_experts, device=self.dist.device),
                t.prior_bias_rate)
        assignment = build_assignment(
            balance=t.balance, prior_bias_rate=t.prior_bias_rate,
            estep_temperature=t.estep_temperature, anneal_updates=t.anneal_updates,
            bias=self.prior_bias.bias if t.prior_bias_rate > 0 else None, dist=self.dist,
            hard=self.method.hard)
        if assignment is not None and assignment.prior_bias is not None:
            self.prior_bias = assignment.prior_bias  # the one the updates move (same tensor)
        return assignment

    def elapsed(self) -> float:
        """Seconds since the run started, over this process and the runs it resumed
        (validation and saving included; `state.train_seconds` leaves them out)."""
        return self.state.wall_time + time.perf_counter() - self.started

    def stop_reason(self) -> str | None:
        """Why training stops now, None while it goes on: --max-update, --max-epoch, a budget
        (--max-flops, --stop-time-hours) or the learning rate at --min-lr."""
        return stop_reason(self.state, self.config, self.elapsed())

    def warm_start(self) -> WarmStart | None:
        """--init-clusters: the train documents' clusters, read from the save dir when a run
        there made them (a resume continues with the assignment it started with)."""
        t = self.config.train
        if t.init_clusters == "none":
            return None
        try:
            clusters = load_or_cluster(self.train_ds, self.save_dir,
                                       self.model_config.num_experts, seed=t.seed,
                                       write=self.dist.is_main, say=self.say)
        except ValueError as e:
            raise MoelabError(str(e)) from None
        return WarmStart(torch.from_numpy(clusters).to(self.dist.device), t.init_updates)

    # ------------------------------------------------------------------ validation
    def validate_and_save(self) -> ValidResult:
        """Validate, log a `valid` line, save checkpoint_last (and checkpoint_best if improved)."""
        state, dist = self.state, self.dist
        result = validate(self.model, self.valid, dist, self.method)
        counts = np.bincount(result.posterior.argmax(1),
                             minlength=self.model_config.num_experts)
        record = {
            "kind": "valid", "update": state.num_updates, "epoch": state.epoch,
            "loss": result.loss, "nll": result.nll, "ppl": result.ppl,
            "num_tokens": result.num_tokens,
            "posterior_mass": result.posterior.mean(0).tolist(),
            "usage_entropy": entropy(torch.from_numpy(counts / counts.sum())),
            "nmi": result.nmi,
            **result.confidence,
            "skipped_updates": state.skipped_updates,
            "wall": self.elapsed(),
            **self.compute_fields(),
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
        total = TrainSums.from_tensor(all_reduce_sum(meter.sums.tensor, self.dist).cpu())
        # identical on every rank (gradients all-reduced)
        grad_norm_sum = float(meter.sums.grad_norm)
        loss = float(total.loss / total.tokens)  # finite: skipped updates never reach the meter
        elapsed = time.perf_counter() - meter.since
        usage = total.argmax_counts / total.argmax_counts.sum()
        scored = float(total.scored_chunks)
        record = {
            "kind": "train", "update": state.num_updates, "epoch": state.epoch,
            "loss": loss, "nll": float(total.nll / total.tokens), "ppl": perplexity(loss),
            "lr": lr, "grad_norm": grad_norm_sum / meter.updates,
            "tokens_per_s": meter.global_tokens / max(elapsed, 1e-9),
            "posterior_mass": (total.responsibility_sum / total.chunks).tolist(),
            "usage_entropy": entropy(usage),
            "skipped_updates": state.skipped_updates,
            "wall": self.elapsed(),
            **self.compute_fields(),
            **(self.assignment.log_fields() if self.assignment is not None else {}),
        }
        if self.reshaped and scored > 0:  # what the M-step trained on is not the posterior
            record["model_posterior_mass"] = (total.posterior_sum / scored).tolist()
        if self.dist.is_main:
            _log_io(self.save_dir, append_record, record)
        meter.reset()
        return record

    def compute_fields(self) -> dict:
        """What training has cost so far, for every log line: model FLOPs and seconds spent
        training (validation and saving excluded), summed over resumes."""
        state = self.state
        fields = {"train_flops": state.train_flops, "train_seconds": state.train_seconds}
        if state.flops_from_update:  # resumed from a checkpoint that did not count compute
            fields["train_flops_from_update"] = state.flops_from_update
        return fields

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
        per_rank = gather_objects((self.rng.state_dict(), self.meter.state_dict()), self.dist)
        if not self.dist.is_main:
            return
        checkpoint = build_checkpoint(
            model=self.model, optimizer=self.optimizer, state=state, prior_bias=self.prior_bias,
            config=self.config, model_config=self.model_config,
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
        parent = self.config.train.finetune_from_model
        if restore is None and parent is not None:
            self.branch(Path(parent))
        elif parent is not None:
            self.say(f"note: --finetune-from-model {parent} is ignored: {self.save_dir} holds a "
                     "checkpoint, so the run resumes from it (fairseq's rule)")
        if restore is not None:
            restore = self.restore_with_fallback(restore)
            self.say(f"resumed from {restore} at update {self.state.num_updates} "
                     f"(epoch {self.state.epoch})")
        if self.dist.is_main:
            _log_io(self.save_dir, truncate_history, self.state.num_updates)
        return restore

    def branch(self, parent: Path) -> None:
        """--finetune-from-model: start from a dense checkpoint's network (moelab.train.branch),
        counting its compute as this run's first."""
        state = self.state
        try:
            info = branch_from_dense(self.model, parent, seed=self.config.train.seed,
                                     tokenizer_sha256=self.train_ds.meta.get("tokenizer_sha256"))
        except ckpt.CheckpointError as e:
            raise MoelabError(str(e)) from None
        state.branched_from = info
        if info["train_flops"] is None:
            self.say(f"note: {parent} was written before moelab counted compute: train_flops "
                     "counts this run's updates only")
        else:
            state.train_flops, state.train_seconds = info["train_flops"], info["train_seconds"]
        self.say(f"branched from the dense model {parent} (update {info['num_updates']}): "
                 f"{self.model_config.num_experts} expert tokens from its indicator token, a "
                 "fresh gating network, optimizer and schedule")

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
        """Check the checkpoint fits this run, then hand each stateful part its state (weights,
        optimizer, RNG, train state and data position, prior bias, meter), so the run continues
        exactly."""
        checkpoint = read_complete(path, map_location=self.dist.device)
        check_resumable(checkpoint, self.model_config,
                        self.train_ds.meta.get("tokenizer_sha256"), path,
                        method=self.config.model.method)
        restored = restore_training(
            checkpoint, path, model=self.model, optimizer=self.optimizer, meter=self.meter,
            rng=self.rng, rank=self.dist.rank, world_size=self.dist.world_size,
            prior_bias_rate=self.config.train.prior_bias_rate)
        self.state, self.prior_bias = restored.state, restored.prior_bias
        if restored.note is not None:
            self.say(f"note: {restored.note}")
        changes = remedy_changes(checkpoint, self.config.train)
        if changes:
            self.say(f"note: {path.name} was trained with other remedies; from update "
                     f"{self.state.num_updates + 1} on this run trains with "
                     f"{', '.join(changes)}")


def _due(state: TrainState, interval: int) -> bool:
    return interval > 0 and state.num_updates % interval == 0


def _passed(before: float, after: float, interval: float) -> bool:
    """Whether a count went past a multiple of `interval` (0: never) between two readings."""
    return interval > 0 and math.floor(after / interval) > math.floor(before / interval)


def stop_reason(state: TrainState, config: RunConfig, elapsed: float) -> str | None:
    """Why a run at `state`, `elapsed` seconds after it first started, stops; None: it goes
    on. Each limit stops like --max-update: the final validation and save follow."""
    t = config.train
    if t.max_update > 0 and state.num_updates >= t.max_update:
        return f"--max-update {t.max_update} reached"
    if t.max_epoch > 0 and state.epoch > t.max_epoch:
        return f"--max-epoch {t.max_epoch} reached"
    if t.max_flops > 0 and state.train_flops >= t.max_flops:
        return (f"--max-flops {t.max_flops:.4g} reached (training has spent "
                f"{state.train_flops:.4g} model FLOPs)")
    if t.stop_time_hours > 0 and elapsed >= t.stop_time_hours * 3600:
        return (f"the run has taken {elapsed / 3600:.3g} hours, --stop-time-hours "
                f"{t.stop_time_hours:g} (fairseq's rule: all of its time, resumes included)")
    if below_min_lr(config.optim, state.num_updates):
        return (f"the learning rate {learning_rate(config.optim, state.num_updates):.3g} is at "
                f"or below --min-lr {config.optim.min_lr:g} (fairseq's rule)")
    return None


def set_seed(seed: int) -> None:
    """The same seed on every rank: identical initial weights (DDP broadcasts them anyway)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _log_io(save_dir: Path, write: Callable, *args) -> None:
    """Write to train_log.jsonl; a full disk or lost permission is a message, not a traceback."""
    try:
        write(save_dir, *args)
    except OSError as e:
        raise MoelabError(f"could not write the training log {Path(save_dir) / 'train_log.jsonl'}"
                          f": {e.strerror or e}; fix that (free space, permissions) and rerun the "
                          "same command to resume from the last checkpoint") from None


def _printer(dist: DistInfo) -> Callable[[str], None]:
    def say(message: str) -> None:
        if dist.is_main:
            tqdm.write(f"moelab train: {message}", file=sys.stderr)
    return say
