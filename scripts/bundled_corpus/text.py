"""What every parser shares: the document record, the build error, logging and text cleaning."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass


@dataclass
class Doc:
    id: str
    text: str


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def decode_mixed(raw: bytes) -> str:
    """UTF-8, with any stray non-UTF-8 byte read as Windows-1252."""
    text = raw.decode("utf-8", errors="surrogateescape")
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    return "".join(
        bytes([ord(ch) - 0xDC00]).decode("cp1252", errors="replace")
        if "\udc80" <= ch <= "\udcff"
        else ch
        for ch in text
    )


def clean_prose(text: str) -> str:
    """Normalise newlines, drop control characters, trailing blanks and runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_RE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def is_clean(text: str) -> bool:
    return not _CONTROL_RE.search(text) and "\r" not in text
