#!/usr/bin/env python3
"""Rebuild moelab's bundled multi-domain corpus from pinned Debian packages.

Standard library only (Python >= 3.10), plus Debian's apt-get, dpkg-deb and gzip.  The code
lives in the package ``scripts/bundled_corpus/``, one module per source format (its
``__init__`` lists them); this file is its command line.  For every domain the script

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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bundled_corpus.build import main

if __name__ == "__main__":
    sys.exit(main())
