"""computing: FOLDOC (dict-foldoc), 15 consecutive entries per document, braces removed."""

from __future__ import annotations

import os

from .dictd import group_entries, read_dictd
from .text import Doc, clean_prose


def clean_foldoc(entry: str) -> str:
    return clean_prose(entry.replace("{", "").replace("}", ""))


def parse_foldoc(root: str) -> list[Doc]:
    d = os.path.join(root, "usr/share/dictd")
    entries = [clean_foldoc(e) for e in read_dictd(f"{d}/foldoc.index", f"{d}/foldoc.dict.dz")]
    return group_entries(entries, 15, "entries-")
