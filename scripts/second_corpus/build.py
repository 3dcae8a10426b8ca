"""Build the second corpus: one folder per domain, one ``NNNN.txt`` file per document.

The command line of ``scripts/build_second_corpus.py``.  Fetching, parsing, the even selection
under ``CAP_BYTES``, validation and the manifest entries are the bundled corpus's
(``bundled_corpus.build``); what is new here is the domains and the folder layout::

  OUT/<domain>/0000.txt ...    the kept documents, in source order
  OUT/MANIFEST.json            provenance, licence and size of every domain
  OUT/.licences/<domain>.copyright
                               the Debian package's copyright file, verbatim

The licence folder's name starts with a dot because moelab's folder reader takes every other
sub-folder for a domain.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from bundled_corpus.build import build_domains, run_with_cache
from bundled_corpus.text import BuildError, Doc

from .domains import DOMAINS, PINNED_PACKAGES

#: Every domain must keep at least this many documents.
MIN_DOCUMENTS = 300
LICENCE_DIR = ".licences"


def write_folder(domain_dir: str, docs: Sequence[Doc]) -> None:
    """Write *docs* as ``0000.txt``, ``0001.txt``, ... (UTF-8, ``\\n`` newlines)."""
    os.makedirs(domain_dir)
    width = max(4, len(str(len(docs) - 1)))
    for k, doc in enumerate(docs):
        path = os.path.join(domain_dir, f"{k:0{width}d}.txt")
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(doc.text)


def build(out_dir: str, cache: str) -> dict:
    """Build every domain into *out_dir*, which must not exist or be empty."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise BuildError(f"{out_dir} is not empty; give a new --out directory")
    return build_domains(
        DOMAINS, PINNED_PACKAGES, out_dir, cache, licence_dir=LICENCE_DIR,
        min_documents=MIN_DOCUMENTS,
        write=lambda name, docs: write_folder(os.path.join(out_dir, name), docs),
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (new or empty)")
    ap.add_argument(
        "--cache", help="directory for the downloaded .deb files (kept; reused when present)"
    )
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)

    def build_into(cache: str) -> int:
        build(out, cache)
        return 0

    return run_with_cache(args.cache, build_into)
