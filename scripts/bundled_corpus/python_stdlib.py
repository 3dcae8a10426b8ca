"""python: Python 3.11 standard-library ``.py`` files of 1-24 KB, verbatim, one per document.

Tests, ``encodings/`` codec tables, ``_sysconfigdata*``, non-UTF-8 files and files with
control characters (form feeds in ``email/``) are left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .text import Doc, is_clean

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
