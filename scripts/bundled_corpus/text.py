"""What every parser shares: the document record, the build error, logging, text cleaning and
splitting long texts at paragraph boundaries."""

from __future__ import annotations

import math
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


def split_paragraphs(body: str, limit: int, min_part: int = 1500) -> list[str]:
    """Split *body* at paragraph boundaries into ceil(len/limit) near-equal parts."""
    if len(body) <= limit:
        return [body]
    paragraphs = body.split("\n\n")
    ends = []
    pos = 0
    for para in paragraphs:
        pos += len(para) + 2
        ends.append(pos)
    nparts = math.ceil(len(body) / limit)
    cuts: list[int] = []  # cut after paragraph index
    prev = -1
    for k in range(1, nparts):
        candidates = range(prev + 1, len(paragraphs) - 1)
        if not candidates:
            break
        target = k * len(body) / nparts
        best = min(candidates, key=lambda i: (abs(ends[i] - target), i))
        cuts.append(best)
        prev = best
    parts = []
    start = 0
    for cut in [*cuts, len(paragraphs) - 1]:
        parts.append("\n\n".join(paragraphs[start : cut + 1]))
        start = cut + 1
    merged: list[str] = []
    for part in parts:
        if merged and (len(part) < min_part or len(merged[-1]) < min_part):
            merged[-1] = merged[-1] + "\n\n" + part
        else:
            merged.append(part)
    return merged
