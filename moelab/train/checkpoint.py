"""Checkpoint files on disk: one plain dict of tensors and primitives, written crash-safely, read
weights-only. What the dict holds (its keys, the parts that fill them, the checks on load) is
moelab.train.state's business; this module knows only the bytes and the format tag.

Only tensors and primitive types go in, so `torch.load(..., weights_only=True)` reads it without
unpickling arbitrary objects: a file crafted to run code when unpickled is refused, never run.

Writing is crash-safe at every instant (a SIGKILL, a full disk, a power cut):
1. the new checkpoint goes to a temporary file in the same folder, is fsynced and read back
   (every zip member's CRC checked) before anything else changes;
2. with `keep_previous` (checkpoint_last.pt) the current file is kept as checkpoint_last.prev.pt
   (a hard link: no copy, no extra space until the next step);
3. os.replace puts the new file under the final name, atomically.
So the final name always holds a complete checkpoint, and the one before it survives beside it:
if checkpoint_last.pt is ever found damaged anyway (a disk fault, a copy cut short), resuming
falls back to checkpoint_last.prev.pt with a message. A failed write raises CheckpointError
naming the file and the reason (e.g. "No space left on device") and leaves both files as they
were.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from moelab.errors import MoelabError
from moelab.train import faults

FORMAT = "moelab-checkpoint"
FORMAT_VERSION = 1
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
TMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp": never mistaken for a *.pt


class CheckpointError(MoelabError):
    """A checkpoint that cannot be read, written or used for this run; the message says what
    to do."""


class UnreadableCheckpoint(CheckpointError):
    """The file is missing, truncated, corrupt or not a moelab checkpoint (vs. one that does not
    fit this run): the case where resuming may fall back to the previous checkpoint."""


def previous_path(path: str | Path) -> Path:
    """checkpoint_last.pt -> checkpoint_last.prev.pt: the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}") if path.name else path


def save_checkpoint(path: str | Path, checkpoint: dict, *, keep_previous: bool = False) -> None:
    """Write `checkpoint` to `path` so that a crash at any instant leaves a readable file there.

    With keep_previous, the file it replaces stays beside it as `previous_path(path)`. Any
    OSError (full disk, permissions, a file-size limit) becomes a CheckpointError naming the file;
    no temporary file is left behind and the existing files are untouched.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError:
                # torch reports a failed write as "unexpected pos ..."; the OSError behind it
                # (ENOSPC, EFBIG, EIO) is what the user needs to see
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            if faults.armed("save"):  # testing hook: die with half the bytes on disk
                f.truncate(f.tell() // 2)
            faults.hit("save")
            os.fsync(f.fileno())
        _verify(Path(tmp))
        faults.hit("replace")
        if keep_previous and path.exists():
            _keep_as_previous(path)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise CheckpointError(_write_failure(path, e)) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


class _Writer:
    """A file wrapper that remembers the OSError torch.save turns into a vague RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _verify(tmp: Path) -> None:
    """Read the new file back (every zip member and its CRC) before it replaces anything."""
    try:
        with zipfile.ZipFile(tmp) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError) as e:
        bad = str(e)
    if bad is not None:
        raise OSError(errno.EIO, f"its bytes do not match their checksums ({bad})")


def _keep_as_previous(path: Path) -> None:
    """path -> previous_path(path), leaving `path` in place (a hard link) where possible."""
    prev = previous_path(path)
    link = prev.with_name(f".{prev.name}{TMP_SUFFIX}")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links here (some network filesystems): move it instead; resuming
        os.replace(path, prev)  # finds checkpoint_last.prev.pt if we die before the next rename
        return
    os.replace(link, prev)


def _write_failure(path: Path, e: OSError) -> str:
    reason = e.strerror or str(e)
    code = f"{errno.errorcode[e.errno]}: " if e.errno in errno.errorcode else ""
    advice = {
        errno.ENOSPC: "free some space (or use another --save-dir)",
        errno.EDQUOT: "free some space within your quota (or use another --save-dir)",
        errno.EACCES: "make the folder writable (or use another --save-dir)",
        errno.EPERM: "make the folder writable (or use another --save-dir)",
        errno.EROFS: "use a --save-dir on a writable filesystem",
        errno.EFBIG: "raise the file-size limit (ulimit -f) or use another --save-dir",
    }.get(e.errno, "fix the cause (or use another --save-dir)")
    return (f"could not write checkpoint {path}: {code}{reason}; the checkpoints already there "
            f"are intact: {advice}, then rerun the same command to resume from the last one")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed process left behind."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".checkpoint*" + TMP_SUFFIX) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
    """The checkpoint dict; a missing, truncated, hostile or foreign file raises
    UnreadableCheckpoint naming it. Nothing in the file is ever run (weights-only unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpoint(f"checkpoint {path} does not exist")
    other = other_checkpoint_hint(path)
    try:
        _verify(path)  # torch.load does not check the CRCs: a damaged block would load silently
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e).lower() or "weights only" in str(e).lower():
            raise UnreadableCheckpoint(
                f"checkpoint {path} holds Python objects other than tensors and plain values "
                f"(a file crafted to run code, or not written by moelab); moelab never unpickles "
                f"such objects and did not run anything from it. Use a checkpoint written by "
                f"`moelab train`{other}") from None
        raise _corrupt(path, e, other) from None
    except (PermissionError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        # the file may well be fine: not UnreadableCheckpoint, so resuming never sets it aside
        raise CheckpointError(
            f"cannot load checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); this is not a "
            "sign of damage: fix the permissions or free memory, then rerun") from None
    except Exception as e:  # zip/pickle/EOF errors all mean the same thing to a user
        raise _corrupt(path, e, other) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UnreadableCheckpoint(
            f"{path} is not a moelab checkpoint (no '{FORMAT}' format tag); fairseq checkpoints "
            "cannot be loaded, train with `moelab train`")
    return checkpoint  # what it must hold: moelab.train.state.read checks that


def other_checkpoint_hint(path: str | Path) -> str:
    """What to use instead of a checkpoint that cannot be read (the end of an error message)."""
    prev = previous_path(path)
    return (f"; the checkpoint before it is kept as {prev}: pass --restore-file {prev}"
            if prev.is_file() else "; pass --restore-file with another checkpoint")


def _corrupt(path: Path, e: Exception, other: str) -> UnreadableCheckpoint:
    detail = str(e).splitlines()[0][:200] if str(e) else ""
    return UnreadableCheckpoint(
        f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}: "
        f"{detail}); delete it to start over{other}")

