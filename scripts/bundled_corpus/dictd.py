"""Reader for dictd databases (``.index`` + ``.dict.dz``), shared by GCIDE and FOLDOC.

``.dict.dz`` is dictzip, a gzip-compatible format, so Python's gzip module reads it whole.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence

from .text import Doc, clean_prose, decode_mixed

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    value = 0
    for ch in s:
        value = value * 64 + _B64.index(ch)
    return value


def read_dictd(index_path: str, dict_path: str) -> list[str]:
    """Entries of a dictd database in file order (one string per distinct data block)."""
    with gzip.open(dict_path, "rb") as fh:  # .dict.dz is gzip-compatible
        data = fh.read()
    blocks: dict[tuple[int, int], list[str]] = {}
    with open(index_path, "rb") as fh:
        for raw in fh:
            fields = raw.rstrip(b"\n").split(b"\t")
            if len(fields) < 3:
                continue
            word = fields[0].decode("utf-8", errors="replace")
            key = (
                _dictd_number(fields[1].decode("ascii")),
                _dictd_number(fields[2].decode("ascii")),
            )
            blocks.setdefault(key, []).append(word)
    entries = []
    for (offset, length), words in sorted(blocks.items()):
        if any(w.lower().startswith(("00-database", "00database")) for w in words):
            continue
        text = decode_mixed(data[offset : offset + length])
        # Drop anything before the entry's own headword line (dictfmt leaves
        # stray preface text in front of the very first entry).
        lines = text.split("\n")
        lowered = tuple(w.lower() for w in words)
        for k, line in enumerate(lines):
            if line[:1].strip() and line.lower().startswith(lowered):
                text = "\n".join(lines[k:])
                break
        if len(text.strip()) < 20:
            continue
        entries.append(text)
    return entries


def group_entries(entries: Sequence[str], size: int, prefix: str) -> list[Doc]:
    docs = []
    for start in range(0, len(entries), size):
        chunk = [e for e in entries[start : start + size] if e.strip()]
        if not chunk:
            continue
        text = "\n".join(e.rstrip("\n") + "\n" for e in chunk)
        end = start + len(entries[start : start + size]) - 1
        docs.append(Doc(f"{prefix}{start:06d}-{end:06d}", clean_prose(text)))
    return docs
