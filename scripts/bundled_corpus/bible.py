"""bible: the King James Bible from bible-kjv-text's BRS data file, one document per chapter.

``usr/lib/bible.data`` is a BRS (Bible Retrieval System) "EC02" file: a header, a table of
window offsets, then the text in fixed-size windows, each an LZW stream of Unix compress(1)
with the 3-byte compress header written once, in front of the first window.  Each window is
decoded by ``gzip -dc`` (gzip reads compress(1) streams) with that header put in front.  gzip
is part of every Debian system (Essential: yes), and its output is byte-identical to the
Python LZW decoder this replaced (all 68 windows of bible-kjv-text 4.38).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess

from .text import BuildError, Doc, clean_prose

#: Chapters in the Protestant canon; a different count means the file was misread.
BIBLE_CHAPTERS = 1189

# fmt: off
BIBLE_BOOKS: tuple[tuple[str, str], ...] = (
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"),
    ("Hos", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"),
    ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nahum", "Nahum"), ("Hab", "Habakkuk"),
    ("Zep", "Zephaniah"), ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"),
    ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"),
    ("Rom", "Romans"), ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"),
    ("Gal", "Galatians"), ("Eph", "Ephesians"), ("Phi", "Philippians"), ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"),
    ("2Jn", "2 John"), ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
)
# fmt: on


def uncompress(stream: bytes) -> bytes:
    """Decode one compress(1) (``.Z``) stream, header included, with ``gzip -dc``."""
    proc = subprocess.run(["gzip", "-dc"], input=stream, capture_output=True)
    if proc.returncode != 0:
        raise BuildError(f"gzip -dc: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def read_brs_text(path: str) -> bytes:
    """Whole text of a BRS 'EC02' data file (header, window table, LZW windows)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"EC02":
        raise BuildError(f"{path}: not a BRS EC02 data file")
    wsize, wnum = struct.unpack(">II", data[84:92])
    offsets = struct.unpack(f">{wnum + 1}I", data[92 : 92 + 4 * (wnum + 1)])
    magic = data[offsets[0] - 3 : offsets[0]]
    if magic[:2] != b"\x1f\x9d":
        raise BuildError(f"{path}: no compress(1) header before the first window")
    text = bytearray()
    for i in range(wnum):
        window = uncompress(magic + data[offsets[i] : offsets[i + 1]])
        if i < wnum - 1 and len(window) != wsize:
            raise BuildError(f"{path}: window {i} decompressed to {len(window)} bytes")
        text += window
    return bytes(text)


def parse_bible(root: str) -> list[Doc]:
    raw = read_brs_text(os.path.join(root, "usr/lib/bible.data"))
    lines = raw.decode("ascii").split("\n")
    books = {abbr: (i, name) for i, (abbr, name) in enumerate(BIBLE_BOOKS)}
    verse_re = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters: dict[tuple[int, int], list[str]] = {}
    for line in lines[1:]:  # line 0 is the title
        if not line.strip():
            continue
        m = verse_re.match(line)
        if not m or m.group(1) not in books:
            raise BuildError(f"bible: unexpected line {line[:60]!r}")
        book = books[m.group(1)][0]
        chapters.setdefault((book, int(m.group(2))), []).append(
            f"{int(m.group(3))} {m.group(4).strip()}"
        )
    docs = []
    for book, chapter in sorted(chapters):
        name = BIBLE_BOOKS[book][1]
        slug = name.lower().replace(" ", "-")
        text = f"{name} {chapter}\n\n" + "\n".join(chapters[(book, chapter)])
        docs.append(Doc(f"{book + 1:02d}-{slug}/{chapter:03d}", clean_prose(text)))
    if len(docs) != BIBLE_CHAPTERS:
        raise BuildError(f"bible: expected {BIBLE_CHAPTERS} chapters, found {len(docs)}")
    return docs
