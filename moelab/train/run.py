"""A Run is a `moelab train` save folder, read only: its model (eval mode), configs, tokenizer,
training log and data, for evaluation, sampling and reports (`Run.load(save_dir_or_checkpoint)`);
moelab.eval.evaluate_run evaluates one and caches its scores beside the checkpoint.

It reads checkpoints through moelab.train.state, which says what a checkpoint holds (docs/design.md
section 6); how the bytes reach the disk is moelab.train.checkpoint's job.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from moelab.data import BinarizedDataset, Tokenizer, read_meta
from moelab.data.preprocess import TOKENIZER_FILE
from moelab.errors import MoelabError
from moelab.model import MixtureLM, ModelConfig
from moelab.train import state as schema
from moelab.train.checkpoint import BEST, LAST
from moelab.train.config import RunConfig
from moelab.train.history import read_history


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[MixtureLM, ModelConfig, RunConfig]:
    """A trained model (in eval mode) and its configs, for notebooks, evaluation and generation."""
    checkpoint = schema.read_complete(path, map_location)
    model, model_config = schema.build_model(checkpoint, path)
    return model.to(map_location).eval(), model_config, schema.run_config(checkpoint, path)


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
        saved = schema.read_complete(file, map_location="cpu")
        model, model_config = schema.build_model(saved, file)
        config = schema.run_config(saved, file)
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
        theirs, ours = schema.tokenizer_sha256_of(saved), meta.get("tokenizer_sha256")
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


__all__ = ["BEST", "LAST", "Run", "load_checkpoint"]
