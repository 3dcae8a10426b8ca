"""A Run is a `moelab train` save folder, and this module is the one place that knows what is in it.

- The checkpoint schema: `build_checkpoint` is every key the trainer writes, `check_resumable`
  refuses a checkpoint that does not fit a run, `build_model` and `RunConfig.from_dict` parse it,
  `restore_training` puts a resume back exactly where the checkpoint was taken.
- `Run`: a trained run, read only, for evaluation, sampling and reports
  (`Run.load(save_dir_or_checkpoint)`), with `.model`, `.tokenizer`, `.config` and `.history`;
  moelab.eval.evaluate_run evaluates one and caches its scores beside the checkpoint.

How the bytes reach the disk (crash-safe writes, checksums, weights-only reads) is
moelab.train.checkpoint's job; what the bytes mean is this module's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from moelab.data import BinarizedDataset, Tokenizer, read_meta
from moelab.data.preprocess import TOKENIZER_FILE
from moelab.errors import MoelabError
from moelab.model import MixtureLM, ModelConfig
from moelab.presets import flag_of
from moelab.train.checkpoint import (
    BEST,
    FORMAT,
    FORMAT_VERSION,
    LAST,
    CheckpointError,
    UnreadableCheckpoint,
    read_checkpoint,
    set_rng_state,
)
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.history import read_history

# What a resume reads besides the model (a file without them is not a training checkpoint).
RESUME_KEYS = ("optimizer", "rng", "data_position", "num_updates", "best_valid_loss")

# ModelConfig fields that make two models' weights interchangeable.
SHAPE_FIELDS = ("num_experts", "vocab_size", "n_layer", "n_embd", "n_head", "ffn_dim",
                "max_seq_len", "share_input_output_embed", "gating", "gating_dim")


@dataclass
class TrainState:
    """Where training stands; all of it goes into the checkpoint."""

    num_updates: int = 0
    epoch: int = 1  # the epoch of the next batch (1-based, as fairseq)
    batch_in_epoch: int = 0  # index of the next batch within that epoch
    best_valid_loss: float = math.inf
    wall_time: float = 0.0  # seconds spent training, summed over resumed runs
    skipped_updates: int = 0  # updates dropped for a non-finite loss or gradient, in all
    bad_in_row: int = 0  # ... since the last good update (0 in every checkpoint)
    # (K,) the loss-free balancing bias on the log prior (--prior-bias-rate), updated in place
    # by moelab.train.assignment.PriorBias; None when the run has none
    prior_bias: torch.Tensor | None = None
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


# ----------------------------------------------------------------------------- the schema


def build_checkpoint(*, model: MixtureLM, optimizer: torch.optim.Optimizer, state: TrainState,
                     config: RunConfig, model_config: ModelConfig, tokenizer: dict,
                     rng: list[dict], meters: list[dict], world_size: int,
                     wall_time: float) -> dict:
    """Everything a run needs to continue exactly, as tensors and primitives only (so that
    `torch.load(weights_only=True)` reads it). `rng` and `meters` hold one entry per rank."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"name": config.optim.lr_scheduler, "num_updates": state.num_updates},
        "rng": rng,
        "data_position": {"epoch": state.epoch, "batch": state.batch_in_epoch,
                          "world_size": world_size},
        "num_updates": state.num_updates,
        "skipped_updates": state.skipped_updates,
        "meter": meters,  # the sums of the log interval in progress
        "best_valid_loss": state.best_valid_loss,
        "wall_time": wall_time,
        "compute": {"train_flops": state.train_flops, "train_seconds": state.train_seconds,
                    "flops_from_update": state.flops_from_update},
        "config": config.to_dict(),
        "model_config": dataclasses.asdict(model_config),
        "tokenizer": tokenizer,  # {"sha256", "vocab_size"} of the data-bin it was trained on
        # only with --prior-bias-rate, so that other checkpoints keep their keys
        **({} if state.prior_bias is None else {"prior_bias": state.prior_bias.detach().cpu()}),
        **({} if state.branched_from is None else {"branched_from": state.branched_from}),
    }


def check_resumable(checkpoint: dict, model_config: ModelConfig, tokenizer_sha256: str | None,
                    path: str | Path, *, method: str | None = None) -> None:
    """Refuse a checkpoint whose method, K, vocabulary or architecture differ from this run's.

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


# The options that decide which expert each chunk trains (moelab.train.assignment, warm_start).
# A resume may change them (rescuing a collapsed run with --balance sinkhorn is a fair
# experiment), but never silently: the run then says from which update it trained otherwise.
REMEDY_FIELDS = ("balance", "prior_bias_rate", "estep_temperature", "anneal_updates",
                 "init_clusters", "init_updates")


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


def restore_training(checkpoint: dict, path: str | Path, model: MixtureLM,
                     optimizer: torch.optim.Optimizer, *, rank: int, world_size: int
                     ) -> tuple[TrainState, dict | None, str | None]:
    """Load weights, optimizer and this rank's RNG state; -> (state, this rank's meter or None,
    a note when the data order changes or the compute before it is unknown). Damage raises
    UnreadableCheckpoint."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng = checkpoint["rng"]
        position = checkpoint["data_position"]
        same_world = position.get("world_size", 1) == world_size
        note = None
        if not same_world:
            note = (f"{path} was written by {position.get('world_size')} process(es) and this "
                    f"run has {world_size}: the data order changes from here")
            state = TrainState(epoch=position["epoch"] + (position["batch"] > 0))
        else:
            state = TrainState(epoch=position["epoch"], batch_in_epoch=position["batch"])
        set_rng_state(rng[rank] if len(rng) == world_size else rng[0])
        meters = checkpoint.get("meter")
        meter = meters[rank] if same_world and meters and len(meters) == world_size else None
        state.num_updates = int(checkpoint["num_updates"])
        state.skipped_updates = int(checkpoint.get("skipped_updates", 0))
        state.best_valid_loss = float(checkpoint["best_valid_loss"])
        state.wall_time = float(checkpoint.get("wall_time", 0.0))
        compute = checkpoint.get("compute")
        if compute is None:  # written before compute was counted: count from here on
            state.flops_from_update = state.num_updates
            note = " ".join(filter(None, [note, (
                f"{path} was written before moelab counted compute: train_flops and "
                f"train_seconds count from update {state.num_updates} on")]))
        else:
            state.train_flops = float(compute["train_flops"])
            state.train_seconds = float(compute["train_seconds"])
            state.flops_from_update = int(compute.get("flops_from_update", 0))
        state.branched_from = checkpoint.get("branched_from")
        bias = checkpoint.get("prior_bias")  # absent before --prior-bias-rate, or without it
        state.prior_bias = None if bias is None else bias.float().to(
            next(model.parameters()).device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise UnreadableCheckpoint(
            f"checkpoint {path} is damaged: its training state cannot be restored "
            f"({_first_line(e)}); use another --save-dir or --restore-file") from None
    return state, meter, note


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[MixtureLM, ModelConfig, RunConfig]:
    """A trained model (in eval mode) and its configs, for notebooks, evaluation and generation."""
    checkpoint = read_checkpoint(path, map_location)
    model, model_config = build_model(checkpoint, path)
    return model.to(map_location).eval(), model_config, run_config(checkpoint, path)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


# ----------------------------------------------------------------------------- a trained run


class Run:
    """A trained run: its model (eval mode), configs and folder, for evaluation and sampling.

    `Run.load` reads a checkpoint from disk; the trainer makes one from the model it holds.
    """

    def __init__(self, *, save_dir: str | Path, model: MixtureLM, model_config: ModelConfig,
                 config: RunConfig, checkpoint_path: str | Path, num_updates: int,
                 data_bin: str | Path | None = None, tokenizer: Tokenizer | None = None,
                 history: pd.DataFrame | None = None):
        self.save_dir, self.checkpoint_path = Path(save_dir), Path(checkpoint_path)
        self.model, self.model_config, self.config = model, model_config, config
        self.num_updates = num_updates
        self.data_bin = Path(data_bin if data_bin is not None else config.data.data)
        self._tokenizer, self._history = tokenizer, history

    @classmethod
    def load(cls, path: str | Path, *, checkpoint: str = BEST, data_bin: str | Path | None = None,
             device: str | torch.device = "cpu") -> Run:
        """A save folder (its `checkpoint`, checkpoint_best.pt by default) or a checkpoint file.

        `data_bin` (default: the one it was trained on) must hold the tokenizer it was trained
        with; another one is refused, since every token id would mean another piece.
        """
        path = Path(path)
        file = path / checkpoint if path.is_dir() else path
        saved = read_checkpoint(file, map_location="cpu")
        model, model_config = build_model(saved, file)
        config = run_config(saved, file)
        data = Path(data_bin) if data_bin is not None else Path(config.data.data)
        run = cls(save_dir=file.parent, model=model.to(device).eval(), model_config=model_config,
                  config=config, checkpoint_path=file,
                  num_updates=int(saved.get("num_updates", 0)), data_bin=data)
        if data_bin is not None:
            run.check_data_bin(saved)
        return run

    def check_data_bin(self, saved: dict) -> None:
        """The data-bin's tokenizer must be the checkpoint's own (same hash, same size)."""
        meta = read_meta(self.data_bin)
        theirs, ours = tokenizer_sha256_of(saved), meta.get("tokenizer_sha256")
        if (theirs and ours and theirs != ours) or self.model_config.vocab_size != int(
                meta["vocab_size"]):
            trained_on = Path(self.config.data.data)
            raise MoelabError(
                f"checkpoint {self.checkpoint_path} and data-bin {self.data_bin} use different "
                f"tokenizers (sha256 {str(theirs)[:12]}... with {self.model_config.vocab_size} "
                f"pieces vs {str(ours)[:12]}... with {meta['vocab_size']}), so every token id "
                "would mean another piece: preprocess that corpus again with the checkpoint's "
                f"tokenizer (moelab preprocess ... --tokenizer {trained_on / TOKENIZER_FILE}), "
                f"or use the data-bin it was trained on ({trained_on})")

    @property
    def method(self) -> str:
        return self.config.model.method

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.data_bin / read_meta(self.data_bin)["tokenizer"])
        return self._tokenizer

    @property
    def history(self) -> pd.DataFrame:
        """The training log (train_log.jsonl) as a DataFrame, read once."""
        if self._history is None:
            self._history = read_history(self.save_dir)
        return self._history

    def dataset(self, split: str) -> BinarizedDataset:
        return BinarizedDataset(self.data_bin, split)

    def __repr__(self) -> str:
        return (f"Run({self.method}, K={self.num_experts}, {self.num_updates} updates, "
                f"{self.checkpoint_path})")


__all__ = ["BEST", "LAST", "Run", "TrainState", "build_checkpoint", "build_model",
           "check_resumable", "load_checkpoint", "restore_training"]
