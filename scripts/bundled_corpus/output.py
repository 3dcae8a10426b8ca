"""Selection and writing, shared by every domain.

``select_even`` keeps the largest evenly spaced subset of a domain's documents that fits
``CAP_BYTES``; ``validate`` checks what is kept; ``write_jsonl_xz`` writes it, deterministically.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterable, Sequence

from .text import BuildError, Doc, is_clean

#: Upper bound on the UTF-8 size of one domain's kept documents.
CAP_BYTES = 1_400_000
#: Every domain must keep at least this many documents.
MIN_DOCUMENTS = 100

XZ_PRESET = 9 | lzma.PRESET_EXTREME


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


def validate(domain: str, docs: Sequence[Doc], min_documents: int | None = None) -> None:
    """Unique ids, no empty document, no control character; at least *min_documents*
    (default ``MIN_DOCUMENTS``) documents."""
    if min_documents is None:
        min_documents = MIN_DOCUMENTS
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
    if len(docs) < min_documents:
        raise BuildError(f"{domain}: only {len(docs)} documents (need {min_documents})")


def write_jsonl_xz(path: str, docs: Iterable[Doc]) -> None:
    payload = "".join(
        json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False, sort_keys=True) + "\n"
        for d in docs
    ).encode("utf-8")
    data = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    with open(path, "wb") as fh:
        fh.write(data)
