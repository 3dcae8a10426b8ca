"""Reading mixed-domain corpora as a stream of documents, and splitting them deterministically.

Three input forms (docs/design.md section 5): a folder with one sub-folder per domain of text files
(one file = one document), a ``.jsonl`` file with ``text`` and optional ``domain``, and
fairseq-style ``.txt`` files (documents separated by blank lines, domain unknown). Everything is
streamed: a corpus is never held in memory, only its document keys.

Files that are not UTF-8 text (undecodable bytes or NUL characters) are skipped with a counted
warning rather than stopping the run, because one stray binary in a folder of thousands should not
cost the user the whole preprocessing; the skipped paths are reported and recorded in meta.json.
A ``.txt`` or ``.jsonl`` file that is not UTF-8 is a whole split, so it stops with an error instead.

Sharded inputs (globs of compressed JSON lines, Parquet) are read by ``moelab.data.shards``; the
record fields (dotted paths such as ``meta.pile_set_name``), the bad-line policy and the two split
schemes live here, shared by every reader.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import MoelabError

UNKNOWN_DOMAIN = "unknown"
SPLITS = ("train", "valid", "test")
LISTED_BAD_LINES = 1000  # bad lines listed one by one in meta.json; the rest are only counted


@dataclass(frozen=True)
class Document:
    key: str  # stable identity within the corpus, e.g. "bible/Genesis.001" or "line:17"
    domain: str  # domain name; UNKNOWN_DOMAIN when the input carries none
    text: str
    where: str = field(default="", compare=False)  # "FILE line N", for messages that name it


@dataclass
class SkipLog:
    """What one pass left out, and why: reported, never silently lost.

    ``paths``: files of a folder corpus that are not UTF-8 text; ``lines``: the first
    LISTED_BAD_LINES records skipped by --skip-bad-lines; ``damaged``: every shard that
    --skip-bad-lines read only up to its damage; ``reasons``: every skipped document
    counted by reason (bad lines, --domains, --max-docs-per-domain); ``left_out_domains``: the
    domains --domains dropped, with their document counts.
    """

    paths: list[str] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    left_out_domains: Counter = field(default_factory=Counter)
    bad_records: int = 0  # records --skip-bad-lines skipped (all counted, the first listed)
    damaged: list[dict] = field(default_factory=list)  # shards read up to their damage

    def add(self, path: Path, reason: str) -> None:
        self.paths.append(f"{path} ({reason})")

    def add_line(self, where: str, reason: str) -> None:
        self.bad_records += 1
        self.reasons[reason] += 1
        if len(self.lines) < LISTED_BAD_LINES:
            self.lines.append({"where": where, "reason": reason})

    def merge(self, other: SkipLog) -> None:
        self.paths += other.paths
        self.lines += other.lines[: LISTED_BAD_LINES - len(self.lines)]
        self.reasons.update(other.reasons)
        self.left_out_domains.update(other.left_out_domains)
        self.bad_records += other.bad_records
        self.damaged += other.damaged

    def summary(self) -> dict:
        """The documents skipped, as meta.json records them."""
        return {"count": sum(self.reasons.values()), "bad_records": self.bad_records,
                "by_reason": dict(sorted(self.reasons.items())),
                "listed": self.lines, "listed_limit": LISTED_BAD_LINES,
                "damaged_shards": self.damaged,
                "left_out_domains": dict(sorted(self.left_out_domains.items()))}


@dataclass(frozen=True)
class RecordFields:
    """Where a JSON or Parquet record keeps its text, domain and id: dotted paths into nested
    objects (``meta.pile_set_name``), as public corpora ship them."""

    text: str = "text"
    domain: str | None = None  # None: the "domain" field when present, else UNKNOWN_DOMAIN
    id: str | None = None  # None: an "id" field in a .jsonl, the file and line in shards


DEFAULT_FIELDS = RecordFields()


class BadRecord(ValueError):
    """A record that cannot be a document: the reason, without the file and line."""


_ABSENT = object()


def field_value(record: dict, path: str):
    """``record``'s value at the dotted ``path`` (a literal key with dots wins), or _ABSENT."""
    if path in record:
        return record[path]
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _json_type(value) -> str:
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def record_fields(record, fields: RecordFields) -> tuple[str, str, str | None]:
    """(text, domain, id or None) of one record; BadRecord says which field is missing."""
    if not isinstance(record, dict):
        raise BadRecord(f"is a JSON {_json_type(record)}, not an object with a "
                        f'"{fields.text}" field')
    text = field_value(record, fields.text)
    if not isinstance(text, str):
        shown = ", ".join(list(record)[:8])
        what = "has no" if text is _ABSENT else f"has a {_json_type(text)} in its"
        raise BadRecord(f'{what} "{fields.text}" text field (its fields: {shown}); name the '
                        "text field with --text-field (dotted paths such as meta.text work)")
    if fields.domain is None:
        domain = str(record.get("domain") or UNKNOWN_DOMAIN)
    else:
        value = field_value(record, fields.domain)
        if value is _ABSENT or value is None or isinstance(value, (dict, list)):
            shown = ", ".join(list(record)[:8])
            raise BadRecord(f'has no "{fields.domain}" domain field (its fields: {shown}); name '
                            "the domain field with --domain-field (e.g. meta.pile_set_name)")
        domain = str(value) or UNKNOWN_DOMAIN
    key = str(record["id"]) if "id" in record else None  # what readers keyed by "id" take
    if fields.id is not None:
        value = field_value(record, fields.id)
        if value is _ABSENT or value is None:
            raise BadRecord(f'has no "{fields.id}" id field; name it with --id-field or leave '
                            "the flag out to key documents by file and line")
        key = str(value)
    return text, domain, key


def skip_or_raise(skipped: SkipLog, where: str, reason: str, skip_bad_lines: bool) -> None:
    """A bad record stops the run with its file and line, unless --skip-bad-lines lists it."""
    if skip_bad_lines:
        skipped.add_line(where, reason)
        return
    raise MoelabError(f"{where} {reason}. Fix or remove it, or pass --skip-bad-lines to skip "
                      "such records (they are counted and listed in meta.json).")


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


@dataclass
class Corpus:
    """A re-iterable source of documents: iterating twice yields the same documents in order."""

    description: str
    open_documents: Callable[[SkipLog], Iterator[Document]]
    skipped: SkipLog = field(default_factory=SkipLog)
    # split each document by a hash of its own key (hashed_split), so that adding documents
    # moves none; False: rank each domain's keys (split_of_keys), as the first readers did
    hashed_split: bool = False
    files: list[dict] = field(default_factory=list)  # shards read: path, bytes, documents

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


def json_line_record(raw: bytes, where: str, fields: RecordFields, skipped: SkipLog,
                     skip_bad_lines: bool) -> tuple[str, str, str | None] | None:
    """(text, domain, id or None) of one JSON line; None for a blank line, an empty text or a
    bad line that --skip-bad-lines skips (a bad line without it raises, naming ``where``)."""
    line = _decode_text(raw, Path(where))
    if line is None:
        skip_or_raise(skipped, where, f"is not UTF-8 text ({_why_not_text(raw)})", skip_bad_lines)
        return None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        skip_or_raise(skipped, where, f"is not valid JSON ({e.msg})", skip_bad_lines)
        return None
    except RecursionError:
        skip_or_raise(skipped, where, "is nested too deeply to be a document record",
                      skip_bad_lines)
        return None
    try:
        text, domain, key = record_fields(record, fields)
    except BadRecord as e:
        skip_or_raise(skipped, where, str(e), skip_bad_lines)
        return None
    if not text.strip():
        skipped.reasons["empty text"] += 1
        return None
    if not _is_unicode(text + domain + (key or "")):
        skip_or_raise(skipped, where, "holds an escape such as \\ud800 that is not a Unicode "
                      "character (a lone surrogate)", skip_bad_lines)
        return None
    return text, domain, key


def jsonl_corpus(path: Path, fields: RecordFields = DEFAULT_FIELDS, *,
                 skip_bad_lines: bool = False) -> Corpus:
    """One JSON object per line with ``text`` and optional ``domain`` (and optional ``id``);
    ``fields`` names other (dotted) fields."""
    path = Path(path)

    def documents(skipped: SkipLog) -> Iterator[Document]:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path} line {number}"
                found = json_line_record(raw, where, fields, skipped, skip_bad_lines)
                if found is None:
                    continue
                text, domain, key = found
                key = f"line:{number}" if key is None else key
                yield Document(f"{domain}/{key}", domain, text, where)

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


def open_corpus(path: str | Path, fields: RecordFields = DEFAULT_FIELDS, *,
                skip_bad_lines: bool = False) -> Corpus:
    """Pick the reader by what ``path`` is: a folder, a ``.jsonl`` file, or any other text file.

    ``fields`` and ``skip_bad_lines`` apply to a ``.jsonl`` (the other forms have no records).
    """
    path = Path(path)
    if not path.exists():
        raise MoelabError(f"{path} does not exist.")
    if path.is_dir():
        return folder_corpus(path)
    if path.stat().st_size == 0:
        raise MoelabError(f"{path} is empty; it must hold at least one document.")
    if path.suffix == ".jsonl":
        return jsonl_corpus(path, fields, skip_bad_lines=skip_bad_lines)
    return txt_corpus(path)


def split_of_keys(
    keys_by_domain: dict[str, list[str]], valid_fraction: float, test_fraction: float
) -> dict[str, str]:
    """Assign each document key to train/valid/test, deterministically and per domain.

    Keys are ranked by a hash of the key (not by order on disk), and each domain gives the first
    round(n * test_fraction) of its ranking to test and the next round(n * valid_fraction) to
    valid, so every domain is represented in proportion and the split survives reordering.
    """
    check_fractions(valid_fraction, test_fraction)
    assignment: dict[str, str] = {}
    for keys in keys_by_domain.values():
        ranked = sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
        n_test = round(len(ranked) * test_fraction)
        n_valid = round(len(ranked) * valid_fraction)
        for i, key in enumerate(ranked):
            assignment[key] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return assignment


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    fractions = (valid_fraction, test_fraction)
    if not all(0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise MoelabError(
            f"--valid-fraction {valid_fraction} and --test-fraction {test_fraction} must each be "
            "in [0, 1) and sum to less than 1."
        )


def key_hash(key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) from the key alone (sha256: the same on every machine)."""
    digest = hashlib.sha256(f"{salt}{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hashed_split(key: str, valid_fraction: float, test_fraction: float) -> str:
    """The split of one document from its key alone: test below test_fraction, valid below
    test_fraction + valid_fraction, else train. No other document changes it, so adding shards
    never moves a document; each domain's shares are the fractions up to sampling noise."""
    h = key_hash(key)
    return "test" if h < test_fraction else "valid" if h < test_fraction + valid_fraction \
        else "train"


def select_documents(corpus: Corpus, domains: list[str] | None,
                     max_per_domain: int | None) -> Corpus:
    """Only the documents of ``domains`` (all when None), at most ``max_per_domain`` of each: the
    first in reading order. What is left out is counted in the pass's SkipLog."""
    if domains is None and max_per_domain is None:
        return corpus
    keep = None if domains is None else set(domains)

    def documents(skipped: SkipLog) -> Iterator[Document]:
        taken: Counter = Counter()
        for doc in corpus.open_documents(skipped):
            if keep is not None and doc.domain not in keep:
                skipped.left_out_domains[doc.domain] += 1
                skipped.reasons["domain not in --domains"] += 1
            elif max_per_domain is not None and taken[doc.domain] >= max_per_domain:
                skipped.reasons["over --max-docs-per-domain"] += 1
            else:
                taken[doc.domain] += 1
                yield doc

    return Corpus(corpus.description, documents, hashed_split=corpus.hashed_split,
                  files=corpus.files)
