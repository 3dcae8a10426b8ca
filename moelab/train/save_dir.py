"""The --save-dir before training: made writable, cleared of a killed save's temporaries, an
earlier run's files never overwritten, and the checkpoint to resume from found."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from moelab.errors import MoelabError
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig
from moelab.train.history import LOG_FILE


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
