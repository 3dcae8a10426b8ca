#!/usr/bin/env python3
"""Rebuild moelab's bundled multi-domain corpus from pinned Debian packages.

Standard library only (Python >= 3.10).  For every domain the script

  1. runs ``apt-get download PACKAGE=VERSION`` (into ``--cache`` or a
     temporary directory; an existing .deb of the pinned version is reused),
  2. extracts it with ``dpkg-deb -x``,
  3. parses the package contents into documents (natural units: a chapter,
     a group of consecutive dictionary entries, a man page, a source file),
  4. keeps an evenly spaced, deterministic subset of at most ``CAP_BYTES``
     of UTF-8 text,

and writes into ``moelab/data/bundled/``:

  <domain>.jsonl.xz           one {"id": ..., "text": ...} object per line
  MANIFEST.json               provenance, licence and size of every domain
  licences/<domain>.copyright the Debian package's copyright file, verbatim

Everything is sorted and nothing depends on time, locale or randomness, so
two runs give byte-identical files.  ``--check`` rebuilds into a temporary
directory and compares with the committed files (exit status 1 on any
difference).

Usage:
    python3 scripts/build_bundled_corpus.py              # rebuild in place
    python3 scripts/build_bundled_corpus.py --check      # verify
    python3 scripts/build_bundled_corpus.py --cache DIR  # keep the .debs
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import lzma
import math
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Pins and domain table
# ---------------------------------------------------------------------------

#: Every Debian binary package used, at the exact version (Debian 12 "bookworm").
PINNED_PACKAGES: dict[str, str] = {
    "bible-kjv-text": "4.38",
    "r-cran-janeaustenr": "1.0.0-1",
    "dict-gcide": "0.48.5+nmu2",
    "dict-foldoc": "20230119-1",
    "r-bioc-go.db": "3.16.0-1",
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
}

#: Upper bound on the UTF-8 size of one domain's kept documents.
CAP_BYTES = 1_400_000
#: Every domain must keep at least this many documents.
MIN_DOCUMENTS = 100

XZ_PRESET = 9 | lzma.PRESET_EXTREME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "moelab", "data", "bundled")


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    packages: tuple[str, ...]  # binary packages whose contents are parsed
    licence_package: str  # package whose usr/share/doc/<pkg>/copyright is shipped
    licence: str
    homepage: str
    unit: str
    parser: str  # name of the parse_* function


DOMAINS: tuple[Domain, ...] = (
    Domain(
        name="bible",
        description=(
            "The King James Version of the Bible "
            "(Authorized Version, as in the bible-kjv data file)"
        ),
        packages=("bible-kjv-text",),
        licence_package="bible-kjv-text",
        licence="public domain",
        homepage="(none upstream; Debian package bible-kjv-text)",
        unit="one chapter (heading line, then one numbered verse per line)",
        parser="parse_bible",
    ),
    Domain(
        name="novels",
        description=(
            "Jane Austen's six completed novels "
            "(Project Gutenberg texts as shipped by the janeaustenr R package)"
        ),
        packages=("r-cran-janeaustenr",),
        licence_package="r-cran-janeaustenr",
        licence="public domain (novels); MIT (janeaustenr package)",
        homepage="https://cran.r-project.org/package=janeaustenr",
        unit=(
            "one chapter; chapters over 6,000 characters are split at paragraph "
            "boundaries into near-equal parts"
        ),
        parser="parse_novels",
    ),
    Domain(
        name="dictionary",
        description=(
            "Webster's Revised Unabridged Dictionary (1913) via GCIDE, "
            "the Collaborative International Dictionary of English"
        ),
        packages=("dict-gcide",),
        licence_package="dict-gcide",
        licence="GPL-2.0-or-later",
        homepage="https://www.gnu.org/software/gcide/",
        unit="20 consecutive dictionary entries",
        parser="parse_gcide",
    ),
    Domain(
        name="computing",
        description="FOLDOC, the Free On-line Dictionary of Computing",
        packages=("dict-foldoc",),
        licence_package="dict-foldoc",
        licence="GFDL-1.1-or-later",
        homepage="https://foldoc.org/",
        unit="15 consecutive dictionary entries",
        parser="parse_foldoc",
    ),
    Domain(
        name="gene_ontology",
        description=(
            "Gene Ontology term names, definitions, synonyms and parents "
            "(GO release 2022-07-01, from Bioconductor GO.db)"
        ),
        packages=("r-bioc-go.db",),
        licence_package="r-bioc-go.db",
        licence="CC-BY-4.0 (Gene Ontology data); Artistic-2.0 (GO.db package)",
        homepage="https://bioconductor.org/packages/GO.db/",
        unit="20 consecutive GO terms in GO-id order",
        parser="parse_gene_ontology",
    ),
    Domain(
        name="manpages",
        description="Linux man-pages, sections 2, 3, 5 and 7, rendered from roff to plain text",
        packages=("manpages", "manpages-dev"),
        licence_package="manpages",
        licence=(
            "GPL-2.0-or-later AND Linux-man-pages-copyleft AND others (per page, see licence file)"
        ),
        homepage="https://www.kernel.org/doc/man-pages/",
        unit="one man page",
        parser="parse_manpages",
    ),
    Domain(
        name="python",
        description="Python 3.11 standard library source code",
        packages=("libpython3.11-minimal", "libpython3.11-stdlib"),
        licence_package="libpython3.11-minimal",
        licence="PSF-2.0",
        homepage="https://www.python.org/",
        unit="one .py file, verbatim (1-24 KB, no tests, no encodings/ codec tables)",
        parser="parse_python",
    ),
)


@dataclass
class Doc:
    id: str
    text: str


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Fetching and extracting the packages
# ---------------------------------------------------------------------------


def _deb_field(path: str, field: str) -> str:
    out = subprocess.run(
        ["dpkg-deb", "-f", path, field], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def fetch_deb(package: str, version: str, cache: str) -> str:
    """Return the path of ``package_version_*.deb`` in *cache*, downloading it if needed."""
    fname_version = version.replace(":", "%3a")
    pattern = os.path.join(cache, f"{package}_{fname_version}_*.deb")
    found = sorted(glob.glob(pattern))
    if not found:
        log(f"  apt-get download {package}={version}")
        proc = subprocess.run(
            ["apt-get", "download", f"{package}={version}"],
            cwd=cache,
            capture_output=True,
            text=True,
        )
        found = sorted(glob.glob(pattern))
        if proc.returncode != 0 or not found:
            raise BuildError(
                f"could not download {package}={version}: {proc.stderr.strip()}\n"
                "(run 'apt-get update', or put the .deb in a --cache directory)"
            )
    path = found[0]
    got = (_deb_field(path, "Package"), _deb_field(path, "Version"))
    if got != (package, version):
        raise BuildError(f"{path} is {got[0]} {got[1]}, expected {package} {version}")
    return path


def extract_deb(deb: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)
    return dest


# ---------------------------------------------------------------------------
# Text helpers
# ---------------------------------------------------------------------------

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


def select_even(docs: Sequence[Doc], cap: int) -> list[Doc]:
    """The largest evenly spaced subset (indices floor(j*N/m)) whose UTF-8 size fits *cap*."""
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    n = len(docs)
    if sum(sizes) <= cap:
        return list(docs)

    def total(m: int) -> int:
        return sum(sizes[(j * n) // m] for j in range(m))

    lo, hi = 1, n  # total(lo) <= cap assumed, find the largest m that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= cap:
            lo = mid
        else:
            hi = mid - 1
    m = lo
    while m > 1 and total(m) > cap:
        m -= 1
    return [docs[(j * n) // m] for j in range(m)]


# ---------------------------------------------------------------------------
# bible: the BRS (Bible Retrieval System) data file, LZW-compressed windows
# ---------------------------------------------------------------------------

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


def lzw_decompress(data: bytes, maxbits: int) -> bytes:
    """Decoder for Unix compress(1) block-mode LZW streams without header.

    Follows the classic implementation (which BRS embeds in compresslib.c):
    codes are read in groups of ``n_bits`` bytes, and a group is abandoned
    whenever the code width grows or the table is cleared.
    """
    out = bytearray()
    maxmaxcode = 1 << maxbits
    prefix = [0] * maxmaxcode
    suffix = bytearray(maxmaxcode)
    suffix[:256] = bytes(range(256))
    pos = 0
    n_bits = 9
    maxcode = (1 << n_bits) - 1
    free_ent = 257
    clear = False
    group = 0
    bit_off = 0
    bit_size = 0

    def getcode() -> int:
        nonlocal pos, n_bits, maxcode, clear, group, bit_off, bit_size
        if clear or bit_off >= bit_size or free_ent > maxcode:
            if free_ent > maxcode:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
            if clear:
                n_bits = 9
                maxcode = (1 << n_bits) - 1
                clear = False
            chunk = data[pos : pos + n_bits]
            pos += len(chunk)
            if not chunk:
                return -1
            group = int.from_bytes(chunk, "little")
            bit_off = 0
            bit_size = len(chunk) * 8 - (n_bits - 1)
        code = (group >> bit_off) & ((1 << n_bits) - 1)
        bit_off += n_bits
        return code

    finchar = oldcode = getcode()
    if oldcode < 0:
        return b""
    out.append(finchar)
    while True:
        code = getcode()
        if code < 0:
            break
        if code == 256:
            clear = True
            free_ent = 256
            code = getcode()
            if code < 0:
                break
        incode = code
        stack = bytearray()
        if code >= free_ent:
            stack.append(finchar)
            code = oldcode
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        finchar = suffix[code]
        stack.append(finchar)
        stack.reverse()
        out += stack
        if free_ent < maxmaxcode:
            prefix[free_ent] = oldcode
            suffix[free_ent] = finchar
            free_ent += 1
        oldcode = incode
    return bytes(out)


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
    maxbits = magic[2] & 0x1F
    text = bytearray()
    for i in range(wnum):
        window = lzw_decompress(data[offsets[i] : offsets[i + 1]], maxbits)
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
    if len(docs) != 1189:
        raise BuildError(f"bible: expected 1189 chapters, found {len(docs)}")
    return docs


# ---------------------------------------------------------------------------
# novels: R lazy-load database (Rdata.rdx / Rdata.rdb) of character vectors
# ---------------------------------------------------------------------------


class _RUnserializer:
    """Minimal reader for R's XDR serialization format (versions 2 and 3)."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise BuildError("R serialization: only XDR format is supported")
        self.data = data
        self.pos = 2
        self.refs: list = []
        version = self.int()
        self.int()
        self.int()
        if version == 3:
            n = self.int()
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def item(self):
        flags = self.int()
        typ = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if typ == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if typ in (254, 253, 252, 251, 250, 242, 241):  # NILVALUE, envs, ...
            return None
        if typ in (249, 248, 247):  # NAMESPACE, PACKAGE, PERSIST
            self.int()
            n = self.int()
            value = ("persist", [self.item() for _ in range(n)])
            self.refs.append(value)
            return value
        if typ == 1:  # SYMSXP
            value = ("sym", self.item())
            self.refs.append(value)
            return value
        if typ == 4:  # ENVSXP
            value = {"env": True}
            self.refs.append(value)
            self.int()
            for _ in range(4):
                self.item()
            return value
        if typ in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return ("pair", tag, car, cdr, attr)
        if typ == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            latin1 = flags & (1 << 14) and not flags & (1 << 15)
            return raw.decode("latin-1" if latin1 else "utf-8")
        if typ in (10, 13, 14, 15, 16, 19, 20, 24):
            n = self.int()
            if n == -1:
                n = (self.int() << 32) + self.int()
            if typ in (10, 13):
                value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            elif typ == 14:
                value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
                self.pos += 8 * n
            elif typ == 15:
                value = list(struct.unpack_from(f">{2 * n}d", self.data, self.pos))
                self.pos += 16 * n
            elif typ == 24:
                value = self.data[self.pos : self.pos + n]
                self.pos += n
            else:
                value = [self.item() for _ in range(n)]
            attr = self.item() if has_attr else None
            return ("vec", typ, value, attr)
        raise BuildError(f"R serialization: unsupported SEXP type {typ}")


def _r_names(attr) -> list[str]:
    while attr is not None:
        _, tag, car, cdr, _ = attr
        if tag == ("sym", "names"):
            return car[2]
        attr = cdr
    return []


def _r_blob(data: bytes) -> bytes:
    """One lazy-load record: 4-byte length, then zlib (or Z/2/0-tagged xz/bzip2/raw)."""
    kind = data[4:5]
    if kind == b"Z":
        return lzma.decompress(data[5:])
    if kind == b"2":
        import bz2

        return bz2.decompress(data[5:])
    if kind == b"0":
        return data[5:]
    return zlib.decompress(data[4:])


def read_r_lazyload(prefix: str) -> dict[str, object]:
    with open(prefix + ".rdx", "rb") as fh:
        index = _RUnserializer(gzip.decompress(fh.read())).item()
    with open(prefix + ".rdb", "rb") as fh:
        db = fh.read()
    top = dict(zip(_r_names(index[3]), index[2], strict=True))
    variables = top["variables"]
    result = {}
    for name, ref in zip(_r_names(variables[3]), variables[2], strict=True):
        offset, length = ref[2]
        result[name] = _RUnserializer(_r_blob(db[offset : offset + length])).item()
    return result


NOVELS: tuple[tuple[str, str], ...] = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
NOVEL_PART_CHARS = 6000


def _split_paragraphs(body: str, limit: int, min_part: int = 1500) -> list[str]:
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


def parse_novels(root: str) -> list[Doc]:
    objects = read_r_lazyload(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    heading_re = re.compile(r"^(CHAPTER|Chapter) ([0-9]+|[IVXLC]+)\.?$")
    volume_re = re.compile(r"^(VOLUME|Volume) ([IVX]+)\.?$")
    docs = []
    for key, title in NOVELS:
        lines = [ln if ln is not None else "" for ln in objects[key][2]]
        chapters: list[tuple[str, list[str]]] = []  # (heading, body lines)
        volume = ""
        for line in lines:
            s = line.strip()
            if volume_re.match(s):
                volume = s
                continue
            if heading_re.match(s):
                chapters.append((f"{volume}, {s}" if volume else s, []))
            elif chapters:
                chapters[-1][1].append(line)
        if not chapters:
            raise BuildError(f"novels: no chapters found in {key}")
        for index, (heading, body_lines) in enumerate(chapters, start=1):
            body = clean_prose("\n".join(body_lines)).strip("\n")
            parts = _split_paragraphs(body, NOVEL_PART_CHARS)
            for k, part in enumerate(parts, start=1):
                label = heading if len(parts) == 1 else f"{heading} (part {k} of {len(parts)})"
                docs.append(
                    Doc(f"{key}/ch{index:02d}.{k}", clean_prose(f"{title}\n{label}\n\n{part}"))
                )
    return docs


# ---------------------------------------------------------------------------
# dictd databases: dictionary (GCIDE) and computing (FOLDOC)
# ---------------------------------------------------------------------------

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


def _accent(letter: str, mark: str) -> str:
    return unicodedata.normalize("NFC", letter + mark)


# GCIDE's ASCII notation for letters and symbols (as written by dictd's
# conversion of the GCIDE XML entities).
# fmt: off
_GCIDE_SYMBOLS = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "=ae": "ǣ", "imac": "ī", "aum": "ä",
    "add": "a\u0324", "udd": "ṳ", "asl": "ā", "ng": "ŋ", "=oo": "o\u035eo", "oo^": "o\u035do",
    "eth": "ð", "th": "þ", "thorn": "þ", "yogh": "ȝ", "deg": "°", "sect": "§", "root": "√",
    "sec": "″", "min": "′", "bprime": "″", "flat": "♭", "sharp": "♯", "hand": "☞",
    "dagger": "†", "para": "¶", "pounds": "£", "times": "×", "div": "÷", "divby": "÷",
    "middot": "·", "rarr": "→", "ldqo": "“", "nbsp": " ", "zdot": "ż", "dsdot": "ḍ",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν",
    "xi": "ξ", "omicron": "ο", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ", "upsilon": "υ",
    "phi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω",
}
# fmt: on
_GCIDE_MARKS = {
    "'": "\u0301",
    "`": "\u0300",
    "^": "\u0302",
    '"': "\u0308",
    "~": "\u0303",
    "=": "\u0304",
    "-": "\u0304",
    ",": "\u0327",
    "*": "\u030a",
}
_GCIDE_CODE_RE = re.compile(
    r"\[(?:([`'^\"~=\-,*])([A-Za-z])|([A-Za-z])\^|\.([A-Za-z])|("
    + "|".join(re.escape(k) for k in sorted(_GCIDE_SYMBOLS, key=len, reverse=True))
    + r"))\]"
)
_SOURCE_TAG_RE = re.compile(
    r"^\s*\[(?:[0-9]{4} Webster|Webster [0-9]{4}|WordNet|PJC|AS|RDH|MW10|RHUD|"
    r"[A-Z]{2,5}\.?\s*\]|\+)[^\]\n]*\]\s*$",
    re.M,
)


def _gcide_code(m: re.Match[str]) -> str:
    mark, letter, breve, dot, symbol = m.groups()
    if mark:
        return _accent(letter, _GCIDE_MARKS[mark])
    if breve:
        return _accent(breve, "\u0306")
    if dot:
        return _accent(dot, "\u0307" if dot in "aA" else "\u0323")
    return _GCIDE_SYMBOLS[symbol]


def clean_gcide(entry: str) -> str:
    entry = _SOURCE_TAG_RE.sub("", entry)
    entry = _GCIDE_CODE_RE.sub(_gcide_code, entry)
    entry = entry.replace("{", "").replace("}", "")
    return clean_prose(entry)


def clean_foldoc(entry: str) -> str:
    return clean_prose(entry.replace("{", "").replace("}", ""))


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


def parse_gcide(root: str) -> list[Doc]:
    d = os.path.join(root, "usr/share/dictd")
    entries = [clean_gcide(e) for e in read_dictd(f"{d}/gcide.index", f"{d}/gcide.dict.dz")]
    return group_entries(entries, 20, "entries-")


def parse_foldoc(root: str) -> list[Doc]:
    d = os.path.join(root, "usr/share/dictd")
    entries = [clean_foldoc(e) for e in read_dictd(f"{d}/foldoc.index", f"{d}/foldoc.dict.dz")]
    return group_entries(entries, 15, "entries-")


# ---------------------------------------------------------------------------
# gene_ontology: GO.sqlite from the GO.db Bioconductor package
# ---------------------------------------------------------------------------

GO_NAMESPACES = {"BP": "biological_process", "MF": "molecular_function", "CC": "cellular_component"}
GO_RELATIONS = {"isa": "is_a"}
GO_GROUP = 20


def parse_gene_ontology(root: str) -> list[Doc]:
    path = os.path.join(root, "usr/lib/R/site-library/GO.db/extdata/GO.sqlite")
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        terms = con.execute(
            "SELECT _id, go_id, term, ontology, definition FROM go_term "
            "WHERE go_id LIKE 'GO:%' ORDER BY go_id"
        ).fetchall()
        names = {row[0]: (row[1], row[2]) for row in terms}
        term_of = {go_id: term for go_id, term in names.values()}
        synonyms: dict[int, list[str]] = {}
        for _id, syn in con.execute(
            "SELECT _id, synonym FROM go_synonym WHERE like_go_id = 0 ORDER BY _id, synonym"
        ):
            synonyms.setdefault(_id, []).append(syn)
        parents: dict[int, list[tuple[str, str]]] = {}
        for table in ("go_bp_parents", "go_cc_parents", "go_mf_parents"):
            for _id, parent, rel in con.execute(
                f"SELECT _id, _parent_id, relationship_type FROM {table}"
            ):
                if parent in names:
                    parents.setdefault(_id, []).append((rel, names[parent][0]))
    finally:
        con.close()
    blocks = []
    for _id, go_id, term, ontology, definition in terms:
        lines = [f"{go_id} {term}", f"Namespace: {GO_NAMESPACES.get(ontology, ontology)}"]
        if definition:
            lines.append(f"Definition: {' '.join(definition.split())}")
        syns = sorted(set(synonyms.get(_id, [])))
        if syns:
            lines.append("Synonyms: " + "; ".join(syns))
        for rel, pid in sorted(set(parents.get(_id, []))):
            lines.append(f"{GO_RELATIONS.get(rel, rel.replace(' ', '_'))}: {pid} {term_of[pid]}")
        blocks.append((go_id, "\n".join(lines) + "\n"))
    docs = []
    for start in range(0, len(blocks), GO_GROUP):
        chunk = blocks[start : start + GO_GROUP]
        text = "\n".join(b for _, b in chunk)
        docs.append(Doc(f"{chunk[0][0]}..{chunk[-1][0]}", clean_prose(text)))
    return docs


# ---------------------------------------------------------------------------
# manpages: a small deterministic roff (man macros) to plain text renderer
# ---------------------------------------------------------------------------

# fmt: off
_ROFF_CHARS = {
    "aq": "'", "dq": "\"", "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "bu": "•", "em": "—",
    "en": "–", "ha": "^", "ti": "~", "ga": "`", "rs": "\\", "sc": "§", "mc": "µ", "+-": "±",
    "pl": "+", "mi": "-", "hy": "-", "dg": "†", "co": "©", "rg": "®", "tm": "™", "de": "°",
    "mu": "×", "di": "÷", "->": "→", "<-": "←", ">=": "≥", "<=": "≤", "!=": "≠", "==": "≡",
    "at": "@", "sl": "/", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "or": "|", "ba": "|",
    "ul": "_", "eq": "=", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "ss": "ß", "if": "∞",
    "pi": "π", "aa": "´", "ct": "¢", "Po": "£", "Eu": "€", "ua": "↑", "da": "↓", "ps": "¶",
    "vb": "|", "ap": "~", "ci": "○", "sq": "□", "ts": "s", "R": "®", "Tm": "™",
}
# fmt: on
_NBSP = "\u00a0"  # kept unbreakable while wrapping, turned into a space afterwards
_JOIN = "\x01"  # \c: join with the next text


def _roff_bracketed(s: str, i: int) -> tuple[str, int]:
    """Name after an escape: 'x', '(xx' or '[name]' starting at s[i]."""
    if i >= len(s):
        return "", i
    if s[i] == "(":
        return s[i + 1 : i + 3], i + 3
    if s[i] == "[":
        j = s.find("]", i)
        if j < 0:
            return s[i + 1 :], len(s)
        return s[i + 1 : j], j + 1
    return s[i], i + 1


def roff_escapes(s: str) -> str:
    out = []
    i = 0
    n = len(s)
    while i < n:
        ch = s[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            break
        e = s[i + 1]
        i += 2
        if e == '"':  # comment to end of line
            break
        if e in "\\e":
            out.append("\\")
        elif e == "-":
            out.append("-")
        elif e in "&|^%:/,)":
            pass
        elif e in "~ 0":
            out.append(_NBSP)
        elif e == "c":
            out.append(_JOIN)
        elif e == "t":
            out.append("\t")
        elif e in "'":
            out.append("´")
        elif e == "`":
            out.append("`")
        elif e == ".":
            out.append(".")
        elif e == "f":
            _, i = _roff_bracketed(s, i)
        elif e == "(" or e == "[":
            name, i = _roff_bracketed(s, i - 1)
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                out.append(chr(int(name[1:], 16)))
            else:
                out.append(_ROFF_CHARS.get(name, ""))
        elif e == "*":
            name, i = _roff_bracketed(s, i)
            out.append(_ROFF_CHARS.get(name, ""))
        elif e == "s":
            if i < n and s[i] in "+-":
                i += 1
            if i < n and s[i] in "([":
                _, i = _roff_bracketed(s, i)
            else:
                while i < n and s[i].isdigit():
                    i += 1
        elif e in "nmgk":
            if i < n and s[i] in "+-":
                i += 1
            _, i = _roff_bracketed(s, i)
        elif e in "whvlLoNxbDSXZAR":
            if i < n:
                delim = s[i]
                j = s.find(delim, i + 1)
                i = n if j < 0 else j + 1
        else:
            out.append(e)
    return "".join(out)


def _roff_args(rest: str) -> list[str]:
    args = []
    i = 0
    n = len(rest)
    while i < n:
        while i < n and rest[i] in " \t":
            i += 1
        if i >= n:
            break
        if rest[i] == '"':
            i += 1
            buf = []
            while i < n:
                if rest[i] == '"':
                    if i + 1 < n and rest[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(rest[i])
                i += 1
            args.append("".join(buf))
        else:
            j = i
            while j < n and rest[j] not in " \t":
                if rest[j] == "\\" and j + 1 < n:
                    j += 2
                else:
                    j += 1
            args.append(rest[i:j])
            i = j
    return args


def _roff_indent(arg: str | None, default: int) -> int:
    if not arg:
        return default
    m = re.match(r"^([+-]?)(\d+(?:\.\d+)?)([a-z]?)$", arg)
    if not m:
        return default
    value = float(m.group(2))
    if m.group(3) in ("i",):
        value *= 10
    elif m.group(3) in ("m",):
        value *= 2
    return int(-value if m.group(1) == "-" else value)


class ManRenderer:
    WIDTH = 80
    BODY = 7

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.words: list[str] = []
        self.fill = True
        self.base = self.BODY
        self.rs_stack: list[int] = []
        self.extra = 0  # .in
        self.para_indent = 0  # additional indent for TP/IP bodies
        self.pending_tag = False
        self.hang: str | None = None
        self.url: str | None = None
        self.pending_heading: int | None = None

    # output helpers -------------------------------------------------------
    def indent(self) -> int:
        return max(0, self.base + self.extra + self.para_indent)

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def emit(self, text: str, indent: int) -> None:
        self.lines.append((" " * indent + text).rstrip())

    def flush(self) -> None:
        if not self.words:
            return
        text = " ".join(self.words).replace(_JOIN, "")
        self.words = []
        ind = self.indent()
        first = " " * ind
        if self.hang is not None:
            tag_ind = max(0, ind - self.BODY)
            if len(self.hang) < self.BODY - 1:
                first = " " * tag_ind + self.hang.ljust(ind - tag_ind)
            else:
                self.emit(self.hang, tag_ind)
            self.hang = None
        wrapped = textwrap.fill(
            text,
            width=self.WIDTH,
            initial_indent=first,
            subsequent_indent=" " * ind,
            break_long_words=False,
            break_on_hyphens=False,
        )
        for line in wrapped.split("\n"):
            self.lines.append(line.rstrip())

    def add_text(self, text: str) -> None:
        if not text.strip() and not self.words:
            return
        if self.pending_heading is not None:
            self.emit(text.replace(_JOIN, "").replace(_NBSP, " ").strip(), self.pending_heading)
            self.pending_heading = None
            return
        if self.pending_tag:
            self.pending_tag = False
            self.drop_hang()
            self.hang = text.replace(_JOIN, "").strip()
            self.para_indent = self.BODY
            return
        if not self.fill:
            self.flush()
            self.drop_hang()
            self.emit(text.replace(_JOIN, ""), self.indent())
            return
        if self.words and self.words[-1].endswith(_JOIN):
            self.words[-1] = self.words[-1][:-1] + text.strip()
        else:
            self.words.append(text.strip())

    def drop_hang(self) -> None:
        """Emit a pending .TP/.IP tag on a line of its own."""
        if self.hang is not None:
            self.emit(self.hang, max(0, self.indent() - self.BODY))
            self.hang = None

    def paragraph(self) -> None:
        self.flush()
        self.drop_hang()
        self.blank()
        self.para_indent = 0

    # macros ------------------------------------------------------------
    FONT_MACROS = ("B", "I", "SM", "SB", "BR", "IR", "RB", "RI", "BI", "IB", "UR", "UE", "MT", "ME")

    def macro(self, name: str, args: list[str]) -> None:
        if name not in self.FONT_MACROS and not (name == "TQ" and self.hang is not None):
            self.flush()
            self.drop_hang()
        if name in ("SH", "SS"):
            self.flush()
            self.pending_tag = False
            self.hang = None
            self.blank()
            title = roff_escapes(" ".join(args)).replace(_JOIN, "").replace(_NBSP, " ")
            if title:
                self.emit(title, 0 if name == "SH" else 3)
            else:
                self.pending_heading = 0 if name == "SH" else 3
            self.base = self.BODY
            self.rs_stack = []
            self.para_indent = 0
            self.extra = 0
        elif name in ("PP", "P", "LP"):
            self.paragraph()
            self.pending_tag = False
        elif name == "TP":
            self.paragraph()
            self.pending_tag = True
        elif name == "TQ":
            self.flush()
            self.drop_hang()
            self.pending_tag = True
        elif name == "IP":
            self.paragraph()
            tag = roff_escapes(args[0]).replace(_JOIN, "") if args else ""
            self.para_indent = self.BODY
            if tag.strip():
                self.hang = tag
        elif name == "HP":
            self.paragraph()
        elif name in ("RS", "INDENT"):
            self.flush()
            self.rs_stack.append(self.base)
            step = _roff_indent(args[0], self.BODY) if args and name == "RS" else self.BODY
            self.base = max(0, self.base + step)
            self.para_indent = 0
        elif name in ("RE", "UNINDENT"):
            self.flush()
            if self.rs_stack:
                self.base = self.rs_stack.pop()
            self.para_indent = 0
        elif name == "in":
            self.flush()
            if not args:
                self.extra = 0
            else:
                arg = args[0]
                value = _roff_indent(arg.lstrip("+-"), 0)
                if arg.startswith("+"):
                    self.extra += value
                elif arg.startswith("-"):
                    self.extra -= value
                else:
                    self.extra = value
        elif name in ("nf", "EX"):
            self.flush()
            self.fill = False
        elif name in ("fi", "EE"):
            self.flush()
            self.fill = True
        elif name == "br":
            self.flush()
        elif name == "sp":
            self.flush()
            self.blank()
        elif name in ("B", "I", "SM", "SB"):
            if args:
                self.add_text(roff_escapes(" ".join(args)))
        elif name in ("BR", "IR", "RB", "RI", "BI", "IB"):
            if args:
                self.add_text(roff_escapes("".join(args)))
        elif name in ("UR", "MT"):
            self.url = args[0] if args else ""
        elif name in ("UE", "ME"):
            if self.url:
                self.add_text(f"<{self.url}>" + (roff_escapes(args[0]) if args else ""))
            elif args:
                self.add_text(roff_escapes(args[0]))
            self.url = None
        # everything else (.TH handled by the caller, .ad, .nh, .PD, .ft, .if, ...) is dropped

    def table(self, rows: list[str]) -> None:
        """Render a tbl(1) block: skip options and format lines, align nothing."""
        self.flush()
        i = 0
        tab = "\t"
        if rows and rows[0].rstrip().endswith(";"):
            m = re.search(r"tab\s*\((.)\)", rows[0])
            if m:
                tab = m.group(1)
            i = 1
        # format lines end with '.'
        while i < len(rows) and not rows[i].rstrip().endswith("."):
            i += 1
        i += 1
        cells_lines: list[list[str]] = []
        block: list[str] | None = None
        current: list[str] = []
        pending = ""
        for row in rows[i:]:
            if block is not None:
                if row.startswith("T}"):
                    current.append(" ".join(block))
                    block = None
                    rest = row[2:]
                    if rest.startswith(tab):
                        pending = rest[1:]
                        parts = pending.split(tab) if pending else []
                        if pending.endswith("T{"):
                            current.extend(parts[:-1])
                            block = []
                            continue
                        current.extend(parts)
                    cells_lines.append(current)
                    current = []
                else:
                    if row.startswith("."):
                        continue
                    block.append(roff_escapes(row).strip())
                continue
            if row.startswith(".T&"):
                continue
            if row.startswith(".") or row.startswith("'"):
                continue
            if row.strip() in ("_", "=", ""):
                continue
            parts = row.split(tab)
            if parts[-1].strip() == "T{":
                current = [roff_escapes(p).strip() for p in parts[:-1]]
                block = []
                continue
            cells_lines.append([roff_escapes(p).strip() for p in parts])
        rows_out = []
        for cells in cells_lines:
            cells = [c.replace(_JOIN, "").replace(_NBSP, " ") for c in cells]
            cells = ["" if c in ("_", "=", "\\^") else c for c in cells]
            if any(c.strip() for c in cells):
                rows_out.append(cells)
        ncols = max((len(r) for r in rows_out), default=0)
        widths = [
            min(30, max((len(r[k]) for r in rows_out if k < len(r) and k < len(r) - 1), default=0))
            for k in range(ncols)
        ]
        self.drop_hang()
        for cells in rows_out:
            line = "  ".join(
                c if k == len(cells) - 1 else c.ljust(widths[k]) for k, c in enumerate(cells)
            )
            self.emit(line, self.indent())

    def render(self, src: str) -> tuple[str, str]:
        title = ""
        src = src.replace("\\\n", "")
        lines = src.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if line.startswith(('.\\"', "'\\\"")) or line in (".", "'"):
                continue
            if line.startswith((".", "'")) and len(line) > 1:
                body = line[1:].lstrip(" \t")
                m = re.match(r"^(\S+)\s*(.*)$", body)
                if not m:
                    continue
                name, rest = m.group(1), m.group(2)
                if '\\"' in rest:
                    rest = rest[: rest.index('\\"')]
                if name == "TH":
                    args = _roff_args(rest)
                    if args:
                        title = roff_escapes(args[0]) + (
                            f"({roff_escapes(args[1])})" if len(args) > 1 else ""
                        )
                    continue
                if name == "TS":
                    block = []
                    while i < len(lines) and not lines[i].startswith(".TE"):
                        block.append(lines[i])
                        i += 1
                    i += 1
                    self.table(block)
                    continue
                if name == "de":
                    while i < len(lines) and not lines[i].startswith(".."):
                        i += 1
                    i += 1
                    continue
                self.macro(name, _roff_args(rest))
                continue
            text = roff_escapes(line)
            if not self.fill and not line.strip():
                self.flush()
                self.drop_hang()
                self.lines.append("")
                continue
            if self.fill:
                if not line.strip():
                    self.paragraph()
                    continue
                if line[:1] in " \t":
                    self.flush()
                    saved = self.fill
                    self.fill = False
                    self.add_text(text)
                    self.fill = saved
                    continue
            self.add_text(text)
        self.flush()
        out = "\n".join(self.lines).replace(_NBSP, " ")
        return title, out


def render_man(src: str) -> tuple[str, str]:
    title, body = ManRenderer().render(src)
    return title, clean_prose((title + "\n\n" if title else "") + body)


MAN_SECTIONS = ("2", "3", "5", "7")
MAN_MIN_CHARS = 500
MAN_MAX_CHARS = 48_000


def parse_manpages(roots: Sequence[str]) -> list[Doc]:
    pages: dict[str, str] = {}
    for root in roots:
        for section in MAN_SECTIONS:
            d = os.path.join(root, "usr/share/man", f"man{section}")
            if not os.path.isdir(d):
                continue
            for fname in sorted(os.listdir(d)):
                path = os.path.join(d, fname)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue  # aliases of other pages
                opener = gzip.open if fname.endswith(".gz") else open
                with opener(path, "rb") as fh:
                    raw = fh.read()
                src = decode_mixed(raw)
                if re.search(r"^\.so\s", src, re.M) and len(src.strip().split("\n")) < 5:
                    continue
                name = fname[:-3] if fname.endswith(".gz") else fname
                pages[f"man{section}/{name}"] = src
    docs = []
    for page_id in sorted(pages):
        _, text = render_man(pages[page_id])
        if len(text) > MAN_MAX_CHARS or len(text) < MAN_MIN_CHARS:
            continue
        docs.append(Doc(page_id, text))
    return docs


# ---------------------------------------------------------------------------
# python: standard library sources, verbatim
# ---------------------------------------------------------------------------

PY_MIN_BYTES = 1_000
PY_MAX_BYTES = 24_000


def parse_python(roots: Sequence[str]) -> list[Doc]:
    files: dict[str, bytes] = {}
    for root in roots:
        base = os.path.join(root, "usr/lib/python3.11")
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, base)
            parts = [] if rel_dir == "." else rel_dir.split(os.sep)
            if any(
                p in ("test", "tests", "idle_test", "encodings", "site-packages", "dist-packages")
                for p in parts
            ):
                continue
            for fname in sorted(filenames):
                path = os.path.join(dirpath, fname)
                if (
                    not fname.endswith(".py")
                    or os.path.islink(path)
                    or fname.startswith("_sysconfigdata")
                ):
                    continue
                if fname.startswith("test_"):
                    continue
                size = os.path.getsize(path)
                if size < PY_MIN_BYTES or size > PY_MAX_BYTES:
                    continue
                with open(path, "rb") as fh:
                    files["/".join([*parts, fname])] = fh.read()
    docs = []
    for rel in sorted(files):
        try:
            text = files[rel].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not is_clean(text):  # e.g. form feeds in the email package
            continue
        docs.append(Doc(rel, text))
    return docs


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------

PARSERS: dict[str, Callable] = {
    "parse_bible": parse_bible,
    "parse_novels": parse_novels,
    "parse_gcide": parse_gcide,
    "parse_foldoc": parse_foldoc,
    "parse_gene_ontology": parse_gene_ontology,
    "parse_manpages": parse_manpages,
    "parse_python": parse_python,
}


def validate(domain: str, docs: Sequence[Doc]) -> None:
    seen = set()
    for doc in docs:
        if doc.id in seen:
            raise BuildError(f"{domain}: duplicate id {doc.id!r}")
        seen.add(doc.id)
        if not doc.text.strip():
            raise BuildError(f"{domain}: empty document {doc.id!r}")
        if not is_clean(doc.text):
            raise BuildError(f"{domain}: control character in {doc.id!r}")
        doc.text.encode("utf-8")  # raises on lone surrogates
    if len(docs) < MIN_DOCUMENTS:
        raise BuildError(f"{domain}: only {len(docs)} documents (need {MIN_DOCUMENTS})")


def write_jsonl_xz(path: str, docs: Iterable[Doc]) -> None:
    payload = "".join(
        json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False, sort_keys=True) + "\n"
        for d in docs
    ).encode("utf-8")
    data = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    with open(path, "wb") as fh:
        fh.write(data)


def build(out_dir: str, cache: str, only: Sequence[str] | None = None) -> dict:
    os.makedirs(os.path.join(out_dir, "licences"), exist_ok=True)
    work = tempfile.mkdtemp(prefix="moelab-corpus-")
    manifest = {"domains": []}
    try:
        roots: dict[str, str] = {}
        for domain in DOMAINS:
            if only and domain.name not in only:
                continue
            t0 = time.monotonic()
            for pkg in domain.packages:
                if pkg not in roots:
                    deb = fetch_deb(pkg, PINNED_PACKAGES[pkg], cache)
                    roots[pkg] = extract_deb(deb, os.path.join(work, pkg))
            pkg_roots = [roots[p] for p in domain.packages]
            parser = PARSERS[domain.parser]
            docs = parser(pkg_roots if len(pkg_roots) > 1 else pkg_roots[0])
            total = len(docs)
            docs = select_even(docs, CAP_BYTES)
            validate(domain.name, docs)
            write_jsonl_xz(os.path.join(out_dir, f"{domain.name}.jsonl.xz"), docs)
            copyright_path = os.path.join(
                roots[domain.licence_package], "usr/share/doc", domain.licence_package, "copyright"
            )
            with (
                open(os.path.realpath(copyright_path), "rb") as src,
                open(os.path.join(out_dir, "licences", f"{domain.name}.copyright"), "wb") as dst,
            ):
                dst.write(src.read())
            versions = sorted({PINNED_PACKAGES[p] for p in domain.packages})
            entry = {
                "name": domain.name,
                "description": domain.description,
                "package": ", ".join(domain.packages),
                "version": ", ".join(versions),
                "licence": domain.licence,
                "licence_file": f"licences/{domain.name}.copyright",
                "homepage": domain.homepage,
                "documents": len(docs),
                "characters": sum(len(d.text) for d in docs),
                "bytes_utf8": sum(len(d.text.encode("utf-8")) for d in docs),
                "unit": domain.unit,
            }
            manifest["domains"].append(entry)
            log(
                f"{domain.name}: kept {len(docs)} of {total} documents, "
                f"{entry['bytes_utf8'] / 1e6:.2f} MB ({time.monotonic() - t0:.1f}s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(out_dir, "MANIFEST.json"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write(json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    return manifest


def _expected_files(out_dir: str) -> list[str]:
    files = ["MANIFEST.json"]
    for domain in DOMAINS:
        files.append(f"{domain.name}.jsonl.xz")
        files.append(f"licences/{domain.name}.copyright")
    return files


def check(committed: str, cache: str) -> int:
    with tempfile.TemporaryDirectory(prefix="moelab-corpus-check-") as tmp:
        build(tmp, cache)
        problems = []
        for rel in _expected_files(tmp):
            a, b = os.path.join(tmp, rel), os.path.join(committed, rel)
            if not os.path.exists(b):
                problems.append(f"missing: {rel}")
                continue
            with open(a, "rb") as fa, open(b, "rb") as fb:
                da, db = fa.read(), fb.read()
            if da == db:
                continue
            if rel.endswith(".xz") and lzma.decompress(da) == lzma.decompress(db):
                log(f"note: {rel}: same content, different xz encoding (liblzma version?)")
                continue
            problems.append(
                f"differs: {rel} (rebuilt sha256 {hashlib.sha256(da).hexdigest()[:16]}, "
                f"committed {hashlib.sha256(db).hexdigest()[:16]})"
            )
        for p in problems:
            log(p)
        if problems:
            log("check FAILED")
            return 1
        log("check OK: the committed corpus matches a fresh rebuild")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    ap.add_argument(
        "--cache", help="directory for the downloaded .deb files (kept; reused when present)"
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temporary directory and compare with --out",
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    tmp_cache = None
    cache = args.cache
    if cache:
        os.makedirs(cache, exist_ok=True)
        cache = os.path.abspath(cache)
    else:
        tmp_cache = tempfile.mkdtemp(prefix="moelab-debs-")
        cache = tmp_cache
    try:
        if args.check:
            rc = check(os.path.abspath(args.out), cache)
        else:
            build(os.path.abspath(args.out), cache)
            rc = 0
    except BuildError as exc:
        log(f"error: {exc}")
        rc = 2
    finally:
        if tmp_cache:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    log(f"done in {time.monotonic() - t0:.1f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
