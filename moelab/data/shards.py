"""Corpora as the public ones ship: globs and lists of shards, streamed one record at a time.

A shard is a JSON-lines file, plain or compressed with gzip, xz or zstd, or a Parquet file.
Records are read a line (or a Parquet batch) at a time, so memory does not grow with a shard's
size. gzip and xz come with Python; zstd and Parquet need ``zstandard`` and ``pyarrow``, the
optional extra ``moelab[corpora]``, imported only when such a shard is read.

A document's key is its shard's path relative to the folder its pattern starts from, and its
line (or row) number: ``pile/00.jsonl.zst:17``, or the value of ``--id-field``. Keys do not depend
on the other shards, which is what lets the hashed split (corpus.hashed_split) keep every
document in its split when shards are added.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import lzma
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from moelab.data.corpus import (
    DEFAULT_FIELDS,
    BadRecord,
    Corpus,
    Document,
    RecordFields,
    SkipLog,
    json_line_record,
    open_corpus,
    record_fields,
    skip_or_raise,
)
from moelab.errors import MoelabError

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".parquet")
EXTRA_HINT = "pip install 'moelab[corpora]'"
READ_BYTES = 1 << 20  # compressed bytes read at a time
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: bounds memory on row groups of any size
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Shard:
    path: Path
    name: str  # path relative to its pattern's folder: the prefix of its documents' keys
    size: int  # bytes on disk


def shard_suffix(path: str | Path) -> str | None:
    name = str(path)
    return next((s for s in SHARD_SUFFIXES if name.endswith(s)), None)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def _pattern_base(pattern: str) -> Path:
    """The folder a glob starts from: its leading parts without glob characters."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def expand_shards(patterns: list[str], *, keyed_by_id: bool = False) -> list[Shard]:
    """Every shard the patterns name (globs expanded, ``**`` recursive), each read once."""
    shards: dict[Path, Shard] = {}
    for pattern in patterns:
        if _is_glob(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise MoelabError(f"--data {pattern} matches no file; check the pattern (quote "
                                  "it so that the shell does not expand it first).")
            base = _pattern_base(pattern)
        else:
            path = Path(pattern)
            if not path.exists():
                raise MoelabError(f"{path} does not exist.")
            if path.is_dir():
                raise MoelabError(
                    f"{path} is a folder: a folder of domain sub-folders is read alone (--data "
                    f"{path}); for a folder of shards give a glob, e.g. "
                    f"--data '{path}/*.jsonl.zst'.")
            files, base = [path], path.parent
        for file in files:
            if shard_suffix(file) is None:
                raise MoelabError(
                    f"{file} is not a shard moelab reads: shards end in "
                    f"{', '.join(SHARD_SUFFIXES)}; narrow the pattern or convert the file.")
            resolved = file.resolve()
            if resolved not in shards:
                name = os.path.relpath(file, base).replace(os.sep, "/")
                shards[resolved] = Shard(file, name, file.stat().st_size)
    if not keyed_by_id:  # with --id-field no key holds the shard's name
        _check_unique_names(list(shards.values()))
    return list(shards.values())


def _check_unique_names(shards: list[Shard]) -> None:
    seen: dict[str, Path] = {}
    for shard in shards:
        if shard.name in seen:
            raise MoelabError(
                f"shards {seen[shard.name]} and {shard.path} would key their documents alike "
                f"({shard.name}:LINE): a key is the shard's path relative to its pattern's "
                "folder. Give them as one glob from a common folder (e.g. 'data/*/*.jsonl.zst') "
                "or key documents with --id-field.")
        seen[shard.name] = shard.path


def _extra(module: str, path: Path):
    """An optional dependency of the ``corpora`` extra, or an error that names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise MoelabError(
            f"{path} needs the {package} package, which moelab installs as an optional extra: "
            f"{EXTRA_HINT}") from None


def _zstd_blocks(file, zstd) -> Iterator[bytes]:
    """Decompressed blocks of a zstd file of one or more frames; a file cut inside a frame
    raises EOFError (zstandard's stream reader would end it silently)."""
    dctx = zstd.ZstdDecompressor()
    frame, fed = dctx.decompressobj(), False
    while data := file.read(READ_BYTES):
        while data:
            fed = True
            if out := frame.decompress(data):
                yield out
            if not frame.eof:
                break
            data = frame.unused_data
            frame, fed = dctx.decompressobj(), False
    if fed and not frame.eof:
        raise EOFError("the zstd stream ends inside a frame (the file is truncated)")


def _lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a stream of byte blocks, each with its newline (the last maybe without)."""
    pending: list[bytes] = []
    for block in blocks:
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            pending.append(block[start : end + 1])
            yield b"".join(pending)
            pending, start = [], end + 1
        if start < len(block):
            pending.append(block[start:])
    if pending:
        yield b"".join(pending)


@contextmanager
def _json_lines(path: Path, suffix: str):
    """The shard's raw lines, decompressed as they are read."""
    if suffix == ".jsonl.zst":
        zstd = _extra("zstandard", path)
        with path.open("rb") as f:
            yield _lines(_zstd_blocks(f, zstd))
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "rb") as f:
            yield f
    elif suffix == ".jsonl.xz":
        with lzma.open(path, "rb") as f:
            yield f
    else:
        with path.open("rb") as f:
            yield f


def _damage_errors(suffix: str) -> tuple[type[BaseException], ...]:
    """What a damaged shard of this kind raises while it is read."""
    errors: list[type[BaseException]] = [EOFError, OSError, lzma.LZMAError, zlib.error]
    extra = {".jsonl.zst": ("zstandard", "ZstdError"), ".parquet": ("pyarrow", "ArrowException")}
    if suffix in extra:  # imported already by the reader; never imported for other shards
        module, name = extra[suffix]
        with suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def _parquet_records(path: Path, fields: RecordFields) -> Iterator[dict]:
    """The rows of a Parquet file as dicts of the columns the fields need, a batch at a time."""
    parquet = _extra("pyarrow.parquet", path)
    file = parquet.ParquetFile(path)
    names = set(file.schema_arrow.names)
    wanted = [fields.text, fields.domain or "domain", fields.id or "id"]
    columns = sorted({p if p in names else p.split(".")[0] for p in wanted} & names)
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def _shard_documents(shard: Shard, fields: RecordFields, skipped: SkipLog,
                     skip_bad_lines: bool) -> Iterator[Document]:
    suffix = shard_suffix(shard.path)
    unit = "row" if suffix == ".parquet" else "line"
    number = 0
    try:
        if suffix == ".parquet":
            for number, record in enumerate(_parquet_records(shard.path, fields), start=1):
                where = f"{shard.path} row {number}"
                try:
                    text, domain, key = record_fields(record, fields)
                except BadRecord as e:
                    skip_or_raise(skipped, where, str(e), skip_bad_lines)
                    continue
                if not text.strip():
                    skipped.reasons["empty text"] += 1
                    continue
                yield _document(shard, number, where, text, domain, key, fields)
        else:
            with _json_lines(shard.path, suffix) as lines:
                for number, raw in enumerate(lines, start=1):
                    where = f"{shard.path} line {number}"
                    found = json_line_record(raw, where, fields, skipped, skip_bad_lines)
                    if found is not None:
                        yield _document(shard, number, where, *found, fields)
    except (PermissionError, FileNotFoundError) as e:  # OSErrors, but not a damaged shard
        raise MoelabError(f"{shard.path} cannot be read ({e.strerror or e}); make it readable "
                          "or leave it out of --data.") from None
    except _damage_errors(suffix) as e:
        reason = (f"is damaged after {unit} {number} ({type(e).__name__}: {e})" if number
                  else f"cannot be read ({type(e).__name__}: {e})")
        if not skip_bad_lines:
            raise MoelabError(
                f"{shard.path} {reason}. Download or write the shard again, leave it out of "
                f"--data, or pass --skip-bad-lines to keep its {unit}s before the damage."
            ) from None
        skipped.damaged.append({"path": str(shard.path), f"{unit}s_read": number,
                                "reason": reason})


def _document(shard: Shard, number: int, where: str, text: str, domain: str, key: str | None,
              fields: RecordFields) -> Document:
    return Document(key if fields.id is not None else f"{shard.name}:{number}", domain, text,
                    where)


def sharded_corpus(shards: list[Shard], fields: RecordFields = DEFAULT_FIELDS, *,
                   skip_bad_lines: bool = False) -> Corpus:
    """The shards' documents in order (shards as given, each in its line or row order)."""
    files = [{"path": str(s.path), "bytes": s.size, "documents": 0} for s in shards]

    def documents(skipped: SkipLog) -> Iterator[Document]:
        for shard, record in zip(shards, files, strict=True):
            record["documents"] = 0
            for doc in _shard_documents(shard, fields, skipped, skip_bad_lines):
                record["documents"] += 1
                yield doc

    shown = ", ".join(s.name for s in shards[:3]) + (", ..." if len(shards) > 3 else "")
    return Corpus(f"{len(shards)} shard(s): {shown}", documents, hashed_split=True, files=files)


def open_data(data: str | list[str], fields: RecordFields = DEFAULT_FIELDS, *,
              skip_bad_lines: bool = False) -> Corpus:
    """The reader for ``--data``: one folder, ``.jsonl`` or text file as before (its keys and
    split unchanged), else every shard the paths and globs name."""
    patterns = [data] if isinstance(data, (str, Path)) else [str(p) for p in data]
    if not patterns:
        raise MoelabError("--data needs at least one path.")
    single = patterns[0]
    if len(patterns) == 1 and not _is_glob(single) and (
            Path(single).is_dir() or shard_suffix(single) in (None, ".jsonl")):
        if Path(single).is_dir() or shard_suffix(single) is None:
            refuse_fields(fields, single)
        return open_corpus(single, fields, skip_bad_lines=skip_bad_lines)
    shards = expand_shards(patterns, keyed_by_id=fields.id is not None)
    return sharded_corpus(shards, fields, skip_bad_lines=skip_bad_lines)


def refuse_fields(fields: RecordFields, source: str,
                  why: str = "is a folder or a text file, whose documents have no fields") -> None:
    """Record-field flags where the input has no records to read them from are an error."""
    if fields != DEFAULT_FIELDS:
        raise MoelabError(
            f"--text-field, --domain-field and --id-field read JSON lines and Parquet records; "
            f"{source} {why}. Leave them out.")
