"""c_headers, emacs_lisp: source files of 1-24 KB, verbatim, split into parts of about
``SRC_PART_CHARS`` characters at blank lines.

Linux's user-space C headers (``usr/include``) and Emacs's Lisp sources (``.el.gz``; the
``leim`` input-method tables are data, not code, and are left out).  Emacs Lisp's page breaks
(form feeds, ``^L``) are removed; files that are not UTF-8 or hold other control characters
are left out.  The parts keep the code's indentation; splitting at blank lines mostly cuts
between top-level definitions, and gives the domains enough documents under the size cap.
"""

from __future__ import annotations

import glob
import gzip
import os

from bundled_corpus.text import Doc, is_clean, split_paragraphs

SRC_MIN_BYTES = 1_000
SRC_MAX_BYTES = 24_000
SRC_PART_CHARS = 4000


def source_text(raw: bytes) -> str | None:
    """The file as a document: UTF-8, form feeds removed; None if it cannot be one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n").replace("\f", "")
    if not is_clean(text) or not text.strip():
        return None
    return text


def split_source(text: str, limit: int) -> list[str]:
    """*text* cut at blank lines into near-equal parts of at most about *limit* characters
    (none under 1,500), each ending in one newline, with nothing but blank lines lost."""
    parts = split_paragraphs(text.rstrip("\n"), limit)
    return [p.strip("\n") + "\n" for p in parts if p.strip()]


def source_files(base: str, suffix: str, skip_dirs: tuple[str, ...] = ()) -> list[Doc]:
    """Files under *base* named ``*suffix`` (gunzipped if it ends in ``.gz``), sorted by path,
    whose text is ``SRC_MIN_BYTES``-``SRC_MAX_BYTES`` bytes, in parts; ids are paths relative to
    *base* and the part number."""
    docs = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for fname in sorted(filenames):
            path = os.path.join(dirpath, fname)
            if not fname.endswith(suffix) or os.path.islink(path):
                continue
            opener = gzip.open if fname.endswith(".gz") else open
            with opener(path, "rb") as fh:
                raw = fh.read()
            if not SRC_MIN_BYTES <= len(raw) <= SRC_MAX_BYTES:
                continue
            text = source_text(raw)
            if text is None:
                continue
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            rel = rel[: -len(".gz")] if rel.endswith(".gz") else rel
            parts = split_source(text, SRC_PART_CHARS)
            docs.extend(Doc(f"{rel}#{k}", part) for k, part in enumerate(parts))
    docs.sort(key=lambda d: d.id)
    return docs


def parse_c_headers(root: str) -> list[Doc]:
    return source_files(os.path.join(root, "usr/include"), ".h")


def parse_emacs_lisp(root: str) -> list[Doc]:
    (lisp_dir,) = glob.glob(os.path.join(root, "usr/share/emacs/[0-9]*/lisp"))
    return source_files(lisp_dir, ".el.gz", skip_dirs=("leim",))
