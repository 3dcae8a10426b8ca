"""Reading mixed-domain corpora as a stream of documents, and splitting them deterministically.

Three input forms (DESIGN.md section 5): a folder with one sub-folder per domain of text files
(one file = one document), a ``.jsonl`` file with ``text`` and optional ``domain``, and
fairseq-style ``.txt`` files (documents separated by blank lines, domain unknown). Everything is
streamed: a corpus is never held in memory, only its document keys.

Files that are not UTF-8 text (undecodable bytes or NUL characters) are skipped with a counted
warning rather than stopping the run, because one stray binary in a folder of thousands should not
cost the user the whole preprocessing; the skipped paths are reported and recorded in meta.json.
A ``.txt`` or ``.jsonl`` file that is not UTF-8 is a whole split, so it stops with an error instead.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import MoelabError

UNKNOWN_DOMAIN = "unknown"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Document:
    key: str  # stable identity within the corpus, e.g. "bible/Genesis.001" or "line:17"
    domain: str  # domain name; UNKNOWN_DOMAIN when the input carries none
    text: str


@dataclass
class SkipLog:
    """Files left out because they are not UTF-8 text; reported, never silently lost."""

    paths: list[str] = field(default_factory=list)

    def add(self, path: Path, reason: str) -> None:
        self.paths.append(f"{path} ({reason})")


def _decode_text(raw: bytes, path: Path) -> str | None:
    """Return the text of a UTF-8 file, or None when it is binary or not UTF-8."""
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _why_not_text(raw: bytes) -> str:
    nul = raw.find(b"\x00")
    if nul >= 0:
        return f"a NUL byte at column {nul + 1}: binary data"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8"
    return "undecodable"


def _is_unicode(text: str) -> bool:
    """False for a str holding lone surrogates (JSON allows "\\ud800"; UTF-8 cannot store it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_whole_file(path: Path) -> str:
    raw = path.read_bytes()
    text = _decode_text(raw, path)
    if text is None:
        raise MoelabError(
            f"{path} is not UTF-8 text (binary bytes or an invalid UTF-8 sequence); "
            "convert it to UTF-8 (e.g. `iconv -t utf-8`) or remove the offending bytes."
        )
    return text


@dataclass
class Corpus:
    """A re-iterable source of documents: iterating twice yields the same documents in order."""

    description: str
    open_documents: Callable[[SkipLog], Iterator[Document]]
    skipped: SkipLog = field(default_factory=SkipLog)

    def __iter__(self) -> Iterator[Document]:
        # Each pass records its own skips; the last pass's list is the one reported.
        self.skipped = SkipLog()
        yield from self.open_documents(self.skipped)


def folder_corpus(root: Path) -> Corpus:
    """One sub-folder per domain, each file in it one document (files found recursively)."""
    root = Path(root)
    if not root.is_dir():
        raise MoelabError(f"{root} is not a folder.")
    domain_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if not domain_dirs:
        hint = f" It holds {len(loose)} loose file(s);" if loose else " It is empty;"
        raise MoelabError(
            f"{root} has no domain sub-folders.{hint} put each domain's text files in a "
            f"sub-folder named after the domain (e.g. {root}/news/*.txt, {root}/code/*.py)."
        )
    files_by_domain: dict[str, list[Path]] = {}
    for d in domain_dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise MoelabError(
                f"domain folder {d} has no files; add text files to it or remove the folder."
            )
        files_by_domain[d.name] = files
    if loose:
        warnings.warn(
            f"{root}: ignoring {len(loose)} file(s) outside the domain sub-folders", stacklevel=2
        )

    def documents(skipped: SkipLog) -> Iterator[Document]:
        for domain, files in files_by_domain.items():
            for path in files:
                text = _decode_text(path.read_bytes(), path)
                if text is None:
                    skipped.add(path, "not UTF-8 text")
                    continue
                if not text.strip():
                    skipped.add(path, "empty")
                    continue
                key = f"{domain}/{path.relative_to(root / domain).as_posix()}"
                yield Document(key, domain, text)

    return Corpus(f"folder {root}", documents)


def jsonl_corpus(path: Path) -> Corpus:
    """One JSON object per line with ``text`` and optional ``domain`` (and optional ``id``)."""
    path = Path(path)

    def documents(skipped: SkipLog) -> Iterator[Document]:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode_text(raw, path)
                if line is None:
                    raise MoelabError(
                        f"{path} line {number} is not UTF-8 text ({_why_not_text(raw)}); fix or "
                        "remove that line."
                    )
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MoelabError(f"{path} line {number} is not valid JSON: {e.msg}.") from None
                except RecursionError:
                    raise MoelabError(
                        f"{path} line {number} is nested too deeply to be a document record."
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise MoelabError(
                        f'{path} line {number} needs a "text" string field '
                        '(and optionally "domain"), e.g. {"text": "...", "domain": "news"}.'
                    )
                if not record["text"].strip():
                    continue
                domain = str(record.get("domain") or UNKNOWN_DOMAIN)
                key = str(record.get("id", f"line:{number}"))
                if not _is_unicode(record["text"] + domain + key):
                    raise MoelabError(
                        f"{path} line {number} holds an escape such as \\ud800 that is not a "
                        "Unicode character (a lone surrogate); fix or remove that line."
                    )
                yield Document(f"{domain}/{key}", domain, record["text"])

    return Corpus(f"jsonl {path}", documents)


def txt_corpus(path: Path) -> Corpus:
    """fairseq-style text: documents separated by one or more blank lines; domain unknown."""
    path = Path(path)

    def documents(skipped: SkipLog) -> Iterator[Document]:
        buffer: list[str] = []
        index = 0
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode_text(raw, path)
                if line is None:
                    raise MoelabError(
                        f"{path} line {number} is not UTF-8 text ({_why_not_text(raw)}); convert "
                        "the file to UTF-8 (e.g. `iconv -t utf-8`) or remove the offending bytes."
                    )
                if line.strip():
                    buffer.append(line)
                elif buffer:
                    yield Document(f"{UNKNOWN_DOMAIN}/{index}", UNKNOWN_DOMAIN, _join(buffer))
                    index += 1
                    buffer = []
        if buffer:
            yield Document(f"{UNKNOWN_DOMAIN}/{index}", UNKNOWN_DOMAIN, _join(buffer))

    return Corpus(f"text {path}", documents)


def _join(lines: list[str]) -> str:
    # The blank line that ends a document is a separator, not part of it.
    return "".join(lines).rstrip("\r\n")


def open_corpus(path: str | Path) -> Corpus:
    """Pick the reader by what ``path`` is: a folder, a ``.jsonl`` file, or any other text file."""
    path = Path(path)
    if not path.exists():
        raise MoelabError(f"{path} does not exist.")
    if path.is_dir():
        return folder_corpus(path)
    if path.stat().st_size == 0:
        raise MoelabError(f"{path} is empty; it must hold at least one document.")
    if path.suffix == ".jsonl":
        return jsonl_corpus(path)
    return txt_corpus(path)


def split_of_keys(
    keys_by_domain: dict[str, list[str]], valid_fraction: float, test_fraction: float
) -> dict[str, str]:
    """Assign each document key to train/valid/test, deterministically and per domain.

    Keys are ranked by a hash of the key (not by order on disk), and each domain gives the first
    round(n * test_fraction) of its ranking to test and the next round(n * valid_fraction) to
    valid, so every domain is represented in proportion and the split survives reordering.
    """
    fractions = (valid_fraction, test_fraction)
    if not all(0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise MoelabError(
            f"--valid-fraction {valid_fraction} and --test-fraction {test_fraction} must each be "
            "in [0, 1) and sum to less than 1."
        )
    assignment: dict[str, str] = {}
    for keys in keys_by_domain.values():
        ranked = sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
        n_test = round(len(ranked) * test_fraction)
        n_valid = round(len(ranked) * valid_fraction)
        for i, key in enumerate(ranked):
            assignment[key] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return assignment
