"""What a checkpoint holds: every key, which part of the training state writes it, which are
optional and what a checkpoint without them means (docs/design.md section 6), and the checks a
checkpoint passes on load.

A checkpoint is one plain dict, filled by the stateful parts of a run, each of which saves and
restores itself (`state_dict` / `load_state_dict`):

- TrainState (here): where training stands, the data position and what training has cost;
- the prior bias (moelab.train.assignment.PriorBias), only with --prior-bias-rate;
- the RNG of each process (`ProcessRNG`, here), one entry per rank;
- the log meter (moelab.train.meter.Meter), one entry per rank;
- the model and the optimizer (torch's own state dicts);
- the schedule (moelab.train.schedule.schedule_state): the rate is a function of num_updates, so
  its entry is a record and a resume reads num_updates from the train state.

`build_checkpoint` gathers the parts' state dicts into the keys of KEYS, and refuses a key that
KEYS does not name, so this table stays the whole truth; `check_readable` and `check_resumable`
refuse what a reader or a resume cannot use, saying what is wrong and what to do;
`restore_training` hands each part its state. How the dict reaches the disk (crash-safe writes,
checksums, weights-only reads) is moelab.train.checkpoint's job; moelab.train.run.Run is the
read-only view of a save folder that reads checkpoints through here.

The keys and their values never change meaning: a checkpoint written by an older moelab (such
as tests/fixtures/run_v1) loads and resumes exactly, and one written now is readable by it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.model import MixtureLM, ModelConfig
from moelab.presets import flag_of
from moelab.train.assignment import PriorBias
from moelab.train.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    UnreadableCheckpoint,
    other_checkpoint_hint,
    read_checkpoint,
)
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.meter import Meter
from moelab.train.schedule import schedule_state

READ, RESUME = "read", "resume"


@dataclass(frozen=True)
class Key:
    """One key of a checkpoint."""

    name: str
    part: str  # the part of the training state that writes it
    needed: str | None = None  # READ: every reader needs it; RESUME: a resume does; None: optional
    written: str = "always"  # or when it is written
    # what restore_training reads when a checkpoint lacks the key (one written before moelab
    # had it); None: every checkpoint moelab ever wrote holds it
    missing: str | None = None


KEYS = (
    Key("format", "checkpoint", READ),  # FORMAT: checked by moelab.train.checkpoint
    Key("format_version", "checkpoint"),
    Key("model", "model", READ),
    Key("optimizer", "optimizer", RESUME),
    Key("scheduler", "schedule"),  # {"name", "num_updates"}, a record: never read back
    Key("rng", "ProcessRNG, one per rank", RESUME),
    Key("data_position", "TrainState", RESUME),  # {"epoch", "batch", "world_size"}
    Key("num_updates", "TrainState", RESUME),
    Key("skipped_updates", "TrainState", missing="0"),
    Key("meter", "Meter, one per rank", missing="a fresh log interval"),
    Key("best_valid_loss", "TrainState", RESUME),
    Key("wall_time", "TrainState", missing="0"),
    Key("compute", "TrainState", missing="counted from the resumed update on"),
    Key("config", "RunConfig", READ),
    Key("model_config", "ModelConfig", READ),
    Key("tokenizer", "the data-bin"),  # {"sha256", "vocab_size"}: compared when both have one
    Key("prior_bias", "PriorBias", written="with --prior-bias-rate (or resumed from a run with it)",
        missing="zeros"),
    Key("branched_from", "TrainState", written="for a run branched from a dense checkpoint",
        missing="a run trained from scratch"),
)
KEY_NAMES = tuple(key.name for key in KEYS)
READ_KEYS = tuple(key.name for key in KEYS if key.needed == READ)
# what a resume reads besides the model (a file without them is not a training checkpoint)
RESUME_KEYS = tuple(key.name for key in KEYS if key.needed == RESUME)
ALWAYS_WRITTEN = tuple(key.name for key in KEYS if key.written == "always")

# ModelConfig fields that make two models' weights interchangeable.
SHAPE_FIELDS = ("num_experts", "vocab_size", "n_layer", "n_embd", "n_head", "ffn_dim",
                "max_seq_len", "share_input_output_embed", "gating", "gating_dim")

# The options that decide which expert each chunk trains (moelab.train.assignment, warm_start).
# A resume may change them (rescuing a collapsed run with --balance sinkhorn is a fair
# experiment), but never silently: the run then says from which update it trained otherwise.
REMEDY_FIELDS = ("balance", "prior_bias_rate", "estep_temperature", "anneal_updates",
                 "init_clusters", "init_updates")


# ----------------------------------------------------------------------------- the parts


@dataclass
class TrainState:
    """Where training stands; all of it but bad_in_row goes into the checkpoint."""

    num_updates: int = 0
    epoch: int = 1  # the epoch of the next batch (1-based, as fairseq)
    batch_in_epoch: int = 0  # index of the next batch within that epoch
    best_valid_loss: float = math.inf
    wall_time: float = 0.0  # seconds spent training, summed over resumed runs
    skipped_updates: int = 0  # updates dropped for a non-finite loss or gradient, in all
    bad_in_row: int = 0  # ... since the last good update (0 in every checkpoint)
    # what training has cost (moelab.train.compute): model FLOPs of every update taken (skipped
    # ones too: their compute was spent) and seconds spent training, validation and saving
    # excluded, summed over resumed runs and, for a branched run, its dense parent's
    train_flops: float = 0.0
    train_seconds: float = 0.0
    # the update from which train_flops counts: 0, or where a checkpoint written before moelab
    # counted compute was resumed (its earlier updates' cost is unknown)
    flops_from_update: int = 0
    # the dense checkpoint a branched run started from (--finetune-from-model): its path,
    # updates and compute (moelab.train.branch); None for a run trained from scratch
    branched_from: dict | None = None

    def state_dict(self, *, world_size: int, wall_time: float) -> dict:
        """Its checkpoint keys. `world_size` goes with the data position (another number of
        ranks deals the batches out differently); `wall_time` is the run's time up to now."""
        return {
            "data_position": {"epoch": self.epoch, "batch": self.batch_in_epoch,
                              "world_size": world_size},
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "best_valid_loss": self.best_valid_loss,
            "wall_time": wall_time,
            "compute": {"train_flops": self.train_flops, "train_seconds": self.train_seconds,
                        "flops_from_update": self.flops_from_update},
            **({} if self.branched_from is None else {"branched_from": self.branched_from}),
        }

    def load_state_dict(self, state: dict, *, world_size: int) -> list[str]:
        """Take a checkpoint's keys; -> notes on what differs from an unbroken run (each to
        follow the checkpoint's path): the data order, compute counted from here."""
        notes = []
        position = state["data_position"]
        if position.get("world_size", 1) == world_size:
            self.epoch, self.batch_in_epoch = position["epoch"], position["batch"]
        else:  # the rest of the epoch cannot be told apart from what was trained: skip it
            notes.append(f"was written by {position.get('world_size')} process(es) and this "
                         f"run has {world_size}: the data order changes from here")
            self.epoch, self.batch_in_epoch = position["epoch"] + (position["batch"] > 0), 0
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.bad_in_row = 0
        self.best_valid_loss = float(state["best_valid_loss"])
        self.wall_time = float(state.get("wall_time", 0.0))
        compute = state.get("compute")
        if compute is None:  # written before compute was counted: count from here on
            self.train_flops = self.train_seconds = 0.0
            self.flops_from_update = self.num_updates
            notes.append(f"was written before moelab counted compute: train_flops and "
                         f"train_seconds count from update {self.num_updates} on")
        else:
            self.train_flops = float(compute["train_flops"])
            self.train_seconds = float(compute["train_seconds"])
            self.flops_from_update = int(compute.get("flops_from_update", 0))
        self.branched_from = state.get("branched_from")
        return notes


class ProcessRNG:
    """This process's random generators (Python, NumPy, torch, the current CUDA device), as
    tensors and primitives: weights_only reads tensors, not NumPy arrays."""

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": torch.tensor(internal, dtype=torch.int64),
            "python_version": version, "python_gauss": gauss,
            "numpy": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
            "numpy_cached": float(cached), "numpy_kind": kind,
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # the current device's generator
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate((state["python_version"],
                         tuple(int(x) for x in state["python"].tolist()), state["python_gauss"]))
        np.random.set_state((state["numpy_kind"], state["numpy"].numpy().astype(np.uint32),
                             state["numpy_pos"], state["numpy_has_gauss"],
                             state["numpy_cached"]))
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())


# ----------------------------------------------------------------------------- saving


def build_checkpoint(*, model: MixtureLM, optimizer: torch.optim.Optimizer, state: TrainState,
                     prior_bias: PriorBias | None, config: RunConfig, model_config: ModelConfig,
                     tokenizer: dict, rng: list[dict], meters: list[dict], world_size: int,
                     wall_time: float) -> dict:
    """The parts' state dicts as one checkpoint, tensors and primitives only (so that
    `torch.load(weights_only=True)` reads it), its keys in KEYS's order. `rng` and `meters`
    hold one state dict per rank; `tokenizer` is {"sha256", "vocab_size"} of the data-bin."""
    parts = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule_state(config.optim, state.num_updates),
        "rng": rng,
        "meter": meters,  # the sums of the log interval in progress
        **state.state_dict(world_size=world_size, wall_time=wall_time),
        "config": config.to_dict(),
        "model_config": dataclasses.asdict(model_config),
        "tokenizer": tokenizer,
        # only with a bias, so that other checkpoints keep their keys
        **({} if prior_bias is None else prior_bias.state_dict()),
    }
    return in_schema(parts)


def in_schema(parts: dict) -> dict:
    """`parts` in KEYS's order; a key KEYS does not name, or an always-written one missing, is
    a bug in the part that wrote it (ValueError), never a file an older reader cannot read."""
    unknown = sorted(set(parts) - set(KEY_NAMES))
    missing = [name for name in ALWAYS_WRITTEN if name not in parts]
    if unknown or missing:
        raise ValueError(f"a checkpoint must hold the keys moelab.train.state.KEYS names: "
                         f"{', '.join(unknown) or 'none'} unknown, "
                         f"{', '.join(missing) or 'none'} missing")
    return {name: parts[name] for name in KEY_NAMES if name in parts}


# ----------------------------------------------------------------------------- loading


def read_complete(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint at `path`, read weights-only and checked to hold what every reader needs."""
    checkpoint = read_checkpoint(path, map_location)
    check_readable(checkpoint, path)
    return checkpoint


def check_readable(checkpoint: dict, path: str | Path) -> None:
    """A checkpoint without a model, its config or the run's config is altered or foreign."""
    missing = [key for key in READ_KEYS if key not in checkpoint]
    if missing or not isinstance(checkpoint["model_config"], dict):
                raise UnreadableCheckpoint(
            f"checkpoint {path} is incomplete (no {', '.join(missing) or 'model_config'}); it was "
            f"not written by this moelab or was altered{other_checkpoint_hint(path)}")


def check_resumable(checkpoint: dict, model_config: ModelConfig, tokenizer_sha256: str | None,
                    path: str | Path, *, method: str | None = None) -> None:
    """Refuse a checkpoint that lacks a key a resume reads, or whose method, K, vocabulary or
    architecture differ from this run's.

    The method matters even where the shapes agree (hMoEup vs sMoEup): resuming would continue
    another method's run and mix both in its log and checkpoints.
    """
    saved = checkpoint["model_config"]
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be resumed from: it lacks "
                                   f"{', '.join(missing)} (altered, or not written by `moelab "
                                   "train`); use another --save-dir or --restore-file")
    for name in SHAPE_FIELDS:
        if name == "gating_dim" and not model_config.gating:
            continue  # no gating network is built: its width does not matter
        ours = getattr(model_config, name)
        if saved.get(name) != ours:
            raise CheckpointError(
                f"checkpoint {path} was trained with {flag_of(name)} = {saved.get(name)} but this "
                f"run has "
                f"{ours}; use another --save-dir (or --restore-file) for a different model, or "
                "rerun with the checkpoint's settings"
            )
    trained = trained_method(checkpoint)
    if method is not None and trained is not None and trained != method:
        raise CheckpointError(
            f"checkpoint {path} was trained with --method {trained} but this run is {method}; "
            "use another --save-dir for another method, or rerun with the checkpoint's method")
    theirs = tokenizer_sha256_of(checkpoint)
    if tokenizer_sha256 and theirs and theirs != tokenizer_sha256:
        raise CheckpointError(
            f"checkpoint {path} was trained with tokenizer sha256 {theirs[:12]}... but this "
            f"data-bin's tokenizer is {tokenizer_sha256[:12]}...; the vocabularies differ: use "
            "another --save-dir, or the data-bin the checkpoint was trained on"
        )


def remedy_changes(checkpoint: dict, train_config: TrainConfig) -> list[str]:
    """'--flag then -> now' for each REMEDY_FIELDS option this run sets otherwise than the run
    that wrote `checkpoint` (one written before an option existed trained with its default)."""
    run = checkpoint.get("config")
    saved = run.get("train", {}) if isinstance(run, dict) else {}
    changes = []
    for name in REMEDY_FIELDS:
        before, now = saved.get(name, getattr(TrainConfig, name)), getattr(train_config, name)
        if before != now:
            changes.append(f"--{name.replace('_', '-')} {before} -> {now}")
    return changes


def trained_method(checkpoint: dict) -> str | None:
    run = checkpoint.get("config")
    return run.get("model", {}).get("method") if isinstance(run, dict) else None


def tokenizer_sha256_of(checkpoint: dict) -> str | None:
    tokenizer = checkpoint.get("tokenizer")
    return tokenizer.get("sha256") if isinstance(tokenizer, dict) else None


def build_model(checkpoint: dict, path: str | Path) -> tuple[MixtureLM, ModelConfig]:
    """The checkpoint's model with its weights (training mode, on CPU); CheckpointError if the
    stored config or weights are inconsistent (an altered or foreign file)."""
    try:
        model_config = ModelConfig(**checkpoint["model_config"])
        model = MixtureLM(model_config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as e:
        raise UnreadableCheckpoint(
            f"checkpoint {path} is damaged: its model config and weights do not fit together "
            f"({_first_line(e)}); use a checkpoint written by `moelab train`") from None
    return model, model_config


def run_config(checkpoint: dict, path: str | Path) -> RunConfig:
    try:
        return RunConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise UnreadableCheckpoint(f"checkpoint {path} holds an invalid training config "
                                   f"({e}); use a checkpoint written by `moelab train`") from None


@dataclass
class Restored:
    """What restore_training hands back besides the parts it loaded in place."""

    state: TrainState
    prior_bias: PriorBias | None  # on the model's device; None: the checkpoint has none
    meter_restored: bool  # False: another world's interval sums are not this rank's
    note: str | None  # the data order changes, or the compute before it is unknown


def restore_training(checkpoint: dict, path: str | Path, *, model: MixtureLM,
                     optimizer: torch.optim.Optimizer, meter: Meter, rng: ProcessRNG, rank: int,
                     world_size: int, prior_bias_rate: float) -> Restored:
    """Hand each stateful part its state from a checkpoint that check_resumable accepted: the
    model, the optimizer, this process's RNG and this rank's meter in place, and a new train
    state and prior bias (built here, since what they are depends on the checkpoint). The
    schedule needs nothing: its rate follows state.num_updates. Damage raises
    UnreadableCheckpoint."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = TrainState()
        notes = state.load_state_dict(checkpoint, world_size=world_size)
        rngs = checkpoint["rng"]
        rng.load_state_dict(rngs[rank] if len(rngs) == world_size else rngs[0])
        same_world = checkpoint["data_position"].get("world_size", 1) == world_size
        meters = checkpoint.get("meter")  # absent before the meter was saved
        meter_restored = bool(same_world and meters and len(meters) == world_size)
        if meter_restored:
            meter.load_state_dict(meters[rank])
        bias = None  # absent before --prior-bias-rate, or without it
        if "prior_bias" in checkpoint:  # kept, and saved again, even if this run's rate is 0
            device = next(model.parameters()).device
            bias = PriorBias(torch.zeros(model.num_experts, device=device), prior_bias_rate)
            bias.load_state_dict(checkpoint)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise UnreadableCheckpoint(
            f"checkpoint {path} is damaged: its training state cannot be restored "
            f"({_first_line(e)}); use another --save-dir or --restore-file") from None
    note = " ".join(f"{path} {n}" for n in notes) or None
    return Restored(state=state, prior_bias=bias, meter_restored=meter_restored, note=note)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


__all__ = ["ALWAYS_WRITTEN", "KEYS", "KEY_NAMES", "READ_KEYS", "REMEDY_FIELDS", "RESUME_KEYS",
           "SHAPE_FIELDS", "Key", "ProcessRNG", "Restored", "TrainState", "build_checkpoint",
           "build_model", "check_readable", "check_resumable", "in_schema", "read_complete",
           "remedy_changes", "restore_training", "run_config", "tokenizer_sha256_of",
           "trained_method"]
