"""Checkpoints: one plain dict of tensors and primitives, written atomically, read weights-only.

Everything a run needs to continue exactly lives in the dict: model, optimizer and schedule
state, RNG states, the data position, the configs as plain dicts and the tokenizer identity. Only
tensors and primitive types go in, so `torch.load(..., weights_only=True)` can read it without
unpickling arbitrary objects.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from moelab.errors import MoelabError
from moelab.model import MixtureLM, ModelConfig
from moelab.train.config import RunConfig

FORMAT = "moelab-checkpoint"
FORMAT_VERSION = 1
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"

# ModelConfig fields that make two models' weights interchangeable, with the flag to name.
_SHAPE_FIELDS = {
    "num_experts": "--num-experts",
    "vocab_size": "vocabulary size",
    "n_layer": "--decoder-layers",
    "n_embd": "--decoder-embed-dim",
    "n_head": "--decoder-attention-heads",
    "ffn_dim": "--decoder-ffn-embed-dim",
    "max_seq_len": "--tokens-per-sample",
    "share_input_output_embed": "--share-decoder-input-output-embed",
    "gating": "learned prior (--method *lp)",
    "gating_dim": "--mean-pool-gating-network-encoder-dim",
}


class CheckpointError(MoelabError):
    """A checkpoint that cannot be read or does not fit this run; the message says what to do."""


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then os.replace.

    A crash (or a full disk) mid-write leaves the previous checkpoint untouched and no partial
    file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict; a missing, truncated or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors all mean the same thing to a user
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: "
            f"{e}); delete it to start over, or pass --restore-file with another checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a moelab checkpoint (no '{FORMAT}' format tag); "
                              "fairseq checkpoints cannot be loaded, train with `moelab train`")
    return checkpoint


def check_compatible(checkpoint: dict, model_config: ModelConfig, tokenizer_sha256: str | None,
                     path: str | Path) -> None:
    """Refuse a checkpoint whose K, vocabulary or architecture differ from this run's."""
    saved = checkpoint["model_config"]
    for name, flag in _SHAPE_FIELDS.items():
        if name == "gating_dim" and not model_config.gating:
            continue  # no gating network is built: its width does not matter
        ours = getattr(model_config, name)
        if saved.get(name) != ours:
            raise CheckpointError(
                f"checkpoint {path} was trained with {flag} = {saved.get(name)} but this run has "
                f"{ours}; use another --save-dir (or --restore-file) for a different model, or "
                "rerun with the checkpoint's settings"
            )
    theirs = checkpoint.get("tokenizer", {}).get("sha256")
    if tokenizer_sha256 and theirs and theirs != tokenizer_sha256:
        raise CheckpointError(
            f"checkpoint {path} was trained with tokenizer sha256 {theirs[:12]}... but this "
            f"data-bin's tokenizer is {tokenizer_sha256[:12]}...; the vocabularies differ: use "
            "another --save-dir, or the data-bin the checkpoint was trained on"
        )


# --- RNG states as tensors (weights_only allows tensors and primitives, not numpy arrays) ---

def rng_state() -> dict:
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


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()),
                     state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[MixtureLM, ModelConfig, RunConfig]:
    """A trained model (in eval mode) and its configs, for notebooks, evaluation and generation."""
    checkpoint = read_checkpoint(path, map_location)
    model_config = ModelConfig(**checkpoint["model_config"])
    model = MixtureLM(model_config)
    model.load_state_dict(checkpoint["model"])
    model.to(map_location).eval()
    return model, model_config, RunConfig.from_dict(checkpoint["config"])
