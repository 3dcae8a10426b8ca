"""The corpus that ships inside the package, so every command works with no data of the user's.

Each domain is one ``<domain>.jsonl.xz`` file under ``moelab/data/bundled/`` (built from Debian
packages by ``scripts/build_bundled_corpus.py``, whose parsers are ``scripts/bundled_corpus/``);
``MANIFEST.json`` names each domain's source package, version and licence.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from pathlib import Path

from moelab.data.corpus import Corpus, Document, SkipLog

BUNDLED_DIR = Path(__file__).parent / "bundled"


def manifest() -> dict:
    """The bundled corpus's manifest: domains with source package, version and licence."""
    return json.loads((BUNDLED_DIR / "MANIFEST.json").read_text(encoding="utf-8"))


def bundled_domains() -> list[str]:
    return [d["name"] for d in manifest()["domains"]]


def bundled_corpus(domains: list[str] | None = None, max_documents: int | None = None) -> Corpus:
    """The bundled corpus as a stream of documents, optionally a subset (for quick tests)."""
    available = bundled_domains()
    chosen = available if domains is None else domains
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"unknown bundled domain(s) {unknown}; available: {available}")

    def documents(skipped: SkipLog) -> Iterator[Document]:
        for domain in chosen:
            with lzma.open(BUNDLED_DIR / f"{domain}.jsonl.xz", "rt", encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if max_documents is not None and i >= max_documents:
                        break
                    record = json.loads(line)
                    yield Document(f"{domain}/{record['id']}", domain, record["text"])

    return Corpus("bundled corpus", documents)
