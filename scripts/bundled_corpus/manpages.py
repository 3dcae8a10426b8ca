"""manpages: Linux man-pages sections 2, 3, 5 and 7, rendered by ``roff``, one page per document.

Alias pages (symlinks, or a short ``.so`` redirect) are skipped, and so are rendered pages
under ``MAN_MIN_CHARS`` or over ``MAN_MAX_CHARS`` characters.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Sequence

from .roff import render_man
from .text import Doc, decode_mixed

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
