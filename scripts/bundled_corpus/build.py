"""Rebuild moelab's bundled multi-domain corpus from pinned Debian packages.

The command line of ``scripts/build_bundled_corpus.py``: ``build`` fetches, extracts and
parses each domain's packages (``domains``), keeps and writes the documents (``output``),
copies the licence file and writes ``MANIFEST.json``; ``check`` rebuilds into a temporary
directory and compares with the committed files.  ``domain_documents``, ``copy_licence``,
``manifest_entry`` and ``write_manifest`` are the steps of ``build`` that the second corpus
(``scripts/second_corpus/``, written as one folder per domain) reuses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence

from .debian import extract_deb, fetch_deb
from .domains import DOMAINS, PINNED_PACKAGES, Domain
from .output import CAP_BYTES, select_even, validate, write_jsonl_xz
from .text import BuildError, Doc, log

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO_ROOT, "moelab", "data", "bundled")


def domain_documents(
    domain: Domain,
    pins: dict[str, str],
    roots: dict[str, str],
    work: str,
    cache: str,
    cap: int,
    min_documents: int | None = None,
) -> tuple[list[Doc], int]:
    """Fetch and extract *domain*'s packages (once: *roots* remembers them), parse, keep an
    even subset under *cap* bytes and validate it.  Returns it and how many the parser gave."""
    for pkg in domain.packages:
        if pkg not in roots:
            deb = fetch_deb(pkg, pins[pkg], cache)
            roots[pkg] = extract_deb(deb, os.path.join(work, pkg))
    pkg_roots = [roots[p] for p in domain.packages]
    docs = domain.parser(pkg_roots if len(pkg_roots) > 1 else pkg_roots[0])
    total = len(docs)
    docs = select_even(docs, cap)
    validate(domain.name, docs, min_documents)
    return docs, total


def copy_licence(domain: Domain, roots: dict[str, str], dest: str) -> None:
    """Copy the licence package's ``usr/share/doc/<pkg>/copyright``, verbatim, to *dest*."""
    copyright_path = os.path.join(
        roots[domain.licence_package], "usr/share/doc", domain.licence_package, "copyright"
    )
    with open(os.path.realpath(copyright_path), "rb") as src, open(dest, "wb") as dst:
        dst.write(src.read())


def manifest_entry(
    domain: Domain, pins: dict[str, str], docs: Sequence[Doc], licence_file: str
) -> dict:
    versions = sorted({pins[p] for p in domain.packages})
    return {
        "name": domain.name,
        "description": domain.description,
        "package": ", ".join(domain.packages),
        "version": ", ".join(versions),
        "licence": domain.licence,
        "licence_file": licence_file,
        "homepage": domain.homepage,
        "documents": len(docs),
        "characters": sum(len(d.text) for d in docs),
        "bytes_utf8": sum(len(d.text.encode("utf-8")) for d in docs),
        "unit": domain.unit,
    }


def write_manifest(out_dir: str, manifest: dict) -> None:
    with open(os.path.join(out_dir, "MANIFEST.json"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write(json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def build_domains(
    domains: Sequence[Domain],
    pins: dict[str, str],
    out_dir: str,
    cache: str,
    *,
    write: Callable[[str, Sequence[Doc]], None],
    licence_dir: str,
    min_documents: int | None = None,
    only: Sequence[str] | None = None,
) -> dict:
    """Fetch, parse, select and validate each domain, ``write(name, docs)`` it, copy its licence
    into *out_dir*/*licence_dir* and write ``MANIFEST.json``: the build of any corpus made of
    pinned Debian packages, whatever layout *write* gives it."""
    os.makedirs(os.path.join(out_dir, licence_dir), exist_ok=True)
    work = tempfile.mkdtemp(prefix="moelab-corpus-")
    manifest = {"domains": []}
    try:
        roots: dict[str, str] = {}
        for domain in domains:
            if only and domain.name not in only:
                continue
            t0 = time.monotonic()
            docs, total = domain_documents(domain, pins, roots, work, cache, CAP_BYTES,
                                           min_documents)
            write(domain.name, docs)
            licence_file = f"{licence_dir}/{domain.name}.copyright"
            copy_licence(domain, roots, os.path.join(out_dir, licence_file))
            entry = manifest_entry(domain, pins, docs, licence_file)
            manifest["domains"].append(entry)
            log(
                f"{domain.name}: kept {len(docs)} of {total} documents, "
                f"{entry['bytes_utf8'] / 1e6:.2f} MB ({time.monotonic() - t0:.1f}s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_manifest(out_dir, manifest)
    return manifest


def build(out_dir: str, cache: str, only: Sequence[str] | None = None) -> dict:
    return build_domains(
        DOMAINS, PINNED_PACKAGES, out_dir, cache, licence_dir="licences", only=only,
        write=lambda name, docs: write_jsonl_xz(os.path.join(out_dir, f"{name}.jsonl.xz"), docs),
    )


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


def run_with_cache(cache: str | None, action: Callable[[str], int]) -> int:
    """``action(cache dir)``'s exit status; the cache is *cache* (kept) or a temporary one
    (removed), a BuildError is logged and exits 2: the frame of every corpus build command."""
    t0 = time.monotonic()
    tmp_cache = None
    if cache:
        os.makedirs(cache, exist_ok=True)
        cache = os.path.abspath(cache)
    else:
        cache = tmp_cache = tempfile.mkdtemp(prefix="moelab-debs-")
    try:
        rc = action(cache)
    except BuildError as exc:
        log(f"error: {exc}")
        rc = 2
    finally:
        if tmp_cache:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    log(f"done in {time.monotonic() - t0:.1f}s")
    return rc


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
    out = os.path.abspath(args.out)
    if args.check:
        return run_with_cache(args.cache, lambda cache: check(out, cache))

    def build_into(cache: str) -> int:
        build(out, cache)
        return 0

    return run_with_cache(args.cache, build_into)
