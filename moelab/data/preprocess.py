"""`moelab preprocess`: corpus -> SentencePiece BPE -> memory-mapped token arrays + meta.json.

With --tokenizer an existing SentencePiece model (a data-bin's spm.model) encodes the corpus
instead: no vocabulary is trained, the model is copied into the data-bin and meta.json records
where it came from, so a model trained on that data-bin can score this corpus (a new domain).

The corpus is streamed three times (a scan for the domains, the split and the tokenizer's
sample, the sampled train text for the tokenizer, then every document for encoding) so memory
stays flat whatever its size: the scan keeps counts (and, for the first input forms, the
document keys), SentencePiece sees at most --spm-sample-bytes of text, and tokens, offsets and
domain ids are appended to disk as they are encoded. Output goes to a staging folder inside
``destdir`` and is moved into place only when complete, meta.json last, so a failed or killed
run leaves no data-bin that looks complete and never touches the user's other files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moelab import __version__
from moelab.data.bundled import BUNDLED_DIR, bundled_corpus
from moelab.data.corpus import (
    SPLITS,
    Corpus,
    Document,
    RecordFields,
    SkipLog,
    check_fractions,
    hashed_split,
    select_documents,
    split_of_keys,
)
from moelab.data.sample import TokenizerSample
from moelab.data.shards import open_data, refuse_fields
from moelab.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from moelab.errors import MoelabError

TOKENIZER_FILE = "spm.model"
META_FILE = "meta.json"
STAGING_PREFIX = ".moelab-staging-"  # the folder inside destdir that output is written to first
ENCODE_BATCH_DOCS = 64


@dataclass
class PreprocessConfig:
    destdir: str  # output folder (the data-bin)
    bundled: bool = False  # preprocess the corpus that ships with moelab
    data: str | None = None  # a folder of domain sub-folders or a .jsonl file, split by fractions
    trainpref: str | None = None  # fairseq-style split files (.txt, .jsonl or a folder)
    validpref: str | None = None
    testpref: str | None = None
    vocab_size: int = 8000  # --nwordssrc: SentencePiece vocabulary size
    # an existing tokenizer (a data-bin's spm.model, or the data-bin folder): encode with it and
    # train none, so that a model trained on that data-bin reads this corpus (a new domain)
    tokenizer: str | None = None
    valid_fraction: float = 0.05  # share of each domain's documents held out (--data/--bundled)
    test_fraction: float = 0.05
    text_field: str = "text"  # (dotted) field of a JSON/Parquet record holding the text
    domain_field: str | None = None  # (dotted) domain field; None: "domain" where present
    id_field: str | None = None  # (dotted) id field keying shard documents (else file:line)
    domains: list[str] | None = None  # keep only these domains (None: all)
    max_docs_per_domain: int | None = None  # keep each domain's first N documents
    skip_bad_lines: bool = False  # count and list bad records in meta.json instead of stopping
    spm_sample_bytes: int = 100_000_000  # most train text SentencePiece learns from
    seed: int = 1  # seeds the tokenizer's sample of the train split
    workers: int = 1  # processes encoding the splits
    force: bool = False  # write into an existing non-empty destdir (never deletes other files)

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, tuple)):  # one path reads as it always did
            self.data = list(self.data) if len(self.data) != 1 else self.data[0]
        if isinstance(self.domains, str):
            self.domains = [d.strip() for d in self.domains.split(",") if d.strip()]
        if self.domains is not None and not self.domains:
            raise MoelabError("--domains needs at least one domain name (a,b,c).")
        if self.max_docs_per_domain is not None and self.max_docs_per_domain < 1:
            raise MoelabError(f"--max-docs-per-domain must be at least 1, got "
                              f"{self.max_docs_per_domain}.")
        if self.spm_sample_bytes < 1:
            raise MoelabError(f"--spm-sample-bytes must be positive, got "
                              f"{self.spm_sample_bytes}.")
        if self.trainpref is None and (self.validpref or self.testpref) and not self.tokenizer:
            raise MoelabError("--validpref/--testpref need --trainpref (the tokenizer is trained "
                              "on it), or --tokenizer to encode with an existing one.")
        split_files = self.trainpref is not None or bool(self.validpref or self.testpref)
        if sum([self.bundled, self.data is not None, split_files]) != 1:
            raise MoelabError(
                "give exactly one input: --bundled, --data PATH, or --trainpref PATH "
                "(with optional --validpref/--testpref)."
            )
        if self.vocab_size < 1:
            raise MoelabError(f"--nwordssrc must be positive, got {self.vocab_size}.")
        if self.workers < 1:
            raise MoelabError(f"--workers must be at least 1, got {self.workers}.")


@dataclass
class SplitWriter:
    """Appends one split's documents to disk: tokens.bin (raw); offsets and domains go to raw
    files too and become .npy files at close, so nothing grows in memory with the corpus."""

    folder: Path
    split: str
    dtype: np.dtype
    documents: int = 0
    tokens: int = 0
    characters: int = 0

    def __post_init__(self) -> None:
        self.tokens_file = open(self.folder / f"{self.split}.tokens.bin", "wb")  # noqa: SIM115
        self.keys_file = open(self.folder / f"{self.split}.docs.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.offsets_file = open(self._raw("offsets"), "wb")  # noqa: SIM115
        self.domains_file = open(self._raw("domains"), "wb")  # noqa: SIM115
        self.offsets_file.write(np.int64(0).tobytes())

    def _raw(self, name: str) -> Path:
        return self.folder / f"{self.split}.{name}.int64"

    def add(self, doc: Document, domain_id: int, ids: list[int]) -> None:
        tokens = np.asarray([*ids, EOS_ID], dtype=self.dtype)
        tokens.tofile(self.tokens_file)
        self.tokens += len(tokens)
        self.documents += 1
        self.offsets_file.write(np.int64(self.tokens).tobytes())
        self.domains_file.write(np.int64(domain_id).tobytes())
        self.characters += len(doc.text)
        self.keys_file.write(json.dumps({"key": doc.key, "domain": doc.domain}) + "\n")

    def close(self) -> dict:
        for file in (self.tokens_file, self.keys_file, self.offsets_file, self.domains_file):
            file.close()
        for name in ("offsets", "domains"):
            _raw_to_npy(self._raw(name), self.folder / f"{self.split}.{name}.npy")
        return {"documents": self.documents, "tokens": self.tokens,
                "characters": self.characters}


def _raw_to_npy(raw: Path, npy: Path, block: int = 1 << 22) -> None:
    """A raw int64 file as an .npy (the bytes np.save writes), copied a block at a time."""
    count = raw.stat().st_size // 8
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.int64, shape=(count,))
    if count:
        source = np.memmap(raw, dtype=np.int64, mode="r")
        for start in range(0, count, block):
            out[start : start + block] = source[start : start + block]
        del source
    out.flush()
    del out
    raw.unlink()


def _sources(config: PreprocessConfig) -> dict[str, Corpus] | Corpus:
    """Either one corpus to split by fractions, or one corpus per given split."""
    fields = RecordFields(config.text_field, config.domain_field, config.id_field)

    def opened(data: str | list[str]) -> Corpus:
        corpus = open_data(data, fields, skip_bad_lines=config.skip_bad_lines)
        return select_documents(corpus, config.domains, config.max_docs_per_domain)

    if config.bundled:
        refuse_fields(fields, "--bundled", "is read as it ships, with its own fields")
        return select_documents(bundled_corpus(), config.domains, config.max_docs_per_domain)
    if config.data is not None:
        return opened(config.data)
    given = {"train": config.trainpref, "valid": config.validpref, "test": config.testpref}
    return {split: opened(path) for split, path in given.items() if path is not None}


def _corpora(sources: dict[str, Corpus] | Corpus) -> list[Corpus]:
    return [sources] if isinstance(sources, Corpus) else list(sources.values())


@dataclass
class Plan:
    """What the scan learns before anything is encoded."""

    documents: dict[str, Counter]  # split -> domain -> documents
    first_seen: dict[str, str]  # domain -> where its first document is ("FILE line N")
    stream: Callable[[], Iterator[tuple[str, Document]]]  # (split, document), re-openable
    sample: TokenizerSample  # the train documents the tokenizer learns from
    scheme: str  # how the split was made, for meta.json

    @property
    def domains(self) -> list[str]:
        return sorted({d for counts in self.documents.values() for d in counts})


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _plan(sources: dict[str, Corpus] | Corpus, config: PreprocessConfig) -> Plan:
    """Scan the input once: domains, documents per split, and the tokenizer's sample."""
    documents: dict[str, Counter] = {split: Counter() for split in SPLITS}
    first_seen: dict[str, str] = {}
    sample = TokenizerSample(config.spm_sample_bytes, config.seed)

    def scanned(corpus: Corpus) -> Iterator[Document]:
        for doc in tqdm(corpus, desc="scanning", unit=" docs", leave=False):
            first_seen.setdefault(doc.domain, doc.where or doc.key)
            yield doc

    if isinstance(sources, dict):
        for split, corpus in sources.items():
            for doc in scanned(corpus):
                documents[split][doc.domain] += 1
                if split == "train":
                    sample.offer(doc.key, _utf8_size(doc.text))

        def given() -> Iterator[tuple[str, Document]]:
            for split, corpus in sources.items():
                for doc in corpus:
                    yield split, doc

        return Plan(documents, first_seen, given, sample, "given files")
    check_fractions(config.valid_fraction, config.test_fraction)
    if sources.hashed_split:
        def split_of(doc: Document) -> str:
            return hashed_split(doc.key, config.valid_fraction, config.test_fraction)

        for doc in scanned(sources):
            split = split_of(doc)
            documents[split][doc.domain] += 1
            if split == "train":
                sample.offer(doc.key, _utf8_size(doc.text))
        scheme = "hash of each document's key"
    else:
        # the first input forms keep the split they always had (ranked per domain), so their
        # data-bins, and every number published from them, stay the same
        keys_by_domain: dict[str, list[str]] = {}
        sizes: list[tuple[str, str, int]] = []  # (domain, key, UTF-8 bytes) in reading order
        for doc in scanned(sources):
            keys_by_domain.setdefault(doc.domain, []).append(doc.key)
            sizes.append((doc.domain, doc.key, _utf8_size(doc.text)))
        assignment = split_of_keys(keys_by_domain, config.valid_fraction, config.test_fraction)
        for domain, key, size in sizes:
            documents[assignment[key]][domain] += 1
            if assignment[key] == "train":
                sample.offer(key, size)

        def split_of(doc: Document) -> str:
            return assignment[doc.key]

        scheme = "ranked per domain by key hash"

    def split_stream() -> Iterator[tuple[str, Document]]:
        for doc in sources:
            yield split_of(doc), doc

    return Plan(documents, first_seen, split_stream, sample, scheme)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
    global _worker_tokenizer  # one tokenizer per encoding process, loaded once
    _worker_tokenizer = Tokenizer(model_proto)


def _encode(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_destdir(destdir: Path, force: bool) -> None:
    if destdir.exists() and not destdir.is_dir():
        raise MoelabError(f"--destdir {destdir} exists and is not a folder; choose another path.")
    if destdir.exists() and any(destdir.iterdir()) and not force:
        entries = list(destdir.iterdir())
        if all(e.name.startswith(STAGING_PREFIX) for e in entries):
            raise MoelabError(
                f"--destdir {destdir} holds only {', '.join(e.name for e in entries)}: what a "
                "preprocess that was killed had written. Delete it (unless a preprocess into "
                f"{destdir} is running now) and run again.")
        raise MoelabError(
            f"--destdir {destdir} already exists and is not empty. Choose another folder, or pass "
            "--force to write moelab's files into it (other files there are left alone)."
        )


def preprocess(config: PreprocessConfig) -> dict:
    """Run the whole preprocessing and return the written meta.json as a dict."""
    destdir = Path(config.destdir)
    _check_destdir(destdir, config.force)
    started = time.perf_counter()
    sources = _sources(config)
    plan = _plan(sources, config)
    if not plan.domains:
        raise MoelabError("the input holds no documents (every file was empty or skipped).")
    _check_domains(plan, sources, config)
    domain_id = {name: i for i, name in enumerate(plan.domains)}

    if config.tokenizer is not None:
        model_proto = existing_tokenizer(config.tokenizer).model_proto
    else:
        plan.sample.check()
        train_texts = (doc.text for split, doc in plan.stream()
                       if split == "train" and plan.sample.keeps(doc.key))
        model_proto = train_tokenizer(train_texts, config.vocab_size, threads=config.workers,
                                      seed=config.seed)
    tokenizer = Tokenizer(model_proto)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32)

    destdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=destdir))
    try:
        (staging / TOKENIZER_FILE).write_bytes(model_proto)
        splits_present = _present_splits(sources)
        writers = {split: SplitWriter(staging, split, dtype) for split in splits_present}
        _encode_all(plan.stream(), writers, domain_id, model_proto, config.workers)
        split_stats = {split: writer.close() for split, writer in writers.items()}
        meta = _meta(config, plan, tokenizer, dtype, split_stats, sources, started)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # meta.json marks a data-bin complete (read_meta): an old one goes before any file is
        # replaced and the new one comes last, so a run killed between two renames leaves no
        # meta.json beside a mix of old and new files
        (destdir / META_FILE).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: (p.name == META_FILE, p.name)):
            os.replace(path, destdir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _warn_skipped(meta, destdir)
    return meta


def _warn_skipped(meta: dict, destdir: Path) -> None:
    if meta["skipped_files"]:
        shown = "; ".join(meta["skipped_files"][:5])
        warnings.warn(
            f"skipped {len(meta['skipped_files'])} file(s) that are empty or not UTF-8 text "
            f"(all listed in {destdir / META_FILE}): {shown}",
            stacklevel=3,
        )
    damaged = meta["skipped_documents"]["damaged_shards"]
    if damaged:
        shown = "; ".join(f"{x['path']} {x['reason']}" for x in damaged[:3])
        warnings.warn(f"--skip-bad-lines read {len(damaged)} damaged shard(s) only up to the "
                      f"damage (listed in {destdir / META_FILE}): {shown}", stacklevel=3)
    bad = meta["skipped_documents"]["bad_records"]
    if bad:
        shown = "; ".join(f"{x['where']}: {x['reason']}"
                          for x in meta["skipped_documents"]["listed"][:3])
        warnings.warn(f"--skip-bad-lines skipped {bad} bad record(s) (counted by reason and "
                      f"listed in {destdir / META_FILE}): {shown}", stacklevel=3)


def _check_domains(plan: Plan, sources: dict[str, Corpus] | Corpus,
                   config: PreprocessConfig) -> None:
    """--domains names that no document has, and (hashed split) domains too small to give
    valid and test documents, each named with the file and line where the domain starts."""
    if config.domains is not None:
        found = set(plan.domains) | {d for c in _corpora(sources)
                                     for d in c.skipped.left_out_domains}
        missing = [d for d in config.domains if d not in found]
        if missing:
            raise MoelabError(
                f"--domains names {', '.join(missing)}, which no document of the input has; its "
                f"domains are {', '.join(sorted(found)) or 'none'}.")
    if not isinstance(sources, Corpus) or not sources.hashed_split:
        return
    wanted = [s for s, f in (("valid", config.valid_fraction), ("test", config.test_fraction))
              if f > 0]
    for domain in plan.domains:
        empty = [s for s in wanted if plan.documents[s][domain] == 0]
        if empty:
            total = sum(plan.documents[s][domain] for s in SPLITS)
            raise MoelabError(
                f"domain {domain!r} (first document: {plan.first_seen[domain]}) has {total} "
                f"document(s), and none fell in {' or '.join(empty)} at --valid-fraction "
                f"{config.valid_fraction} and --test-fraction {config.test_fraction}. Bring more "
                "of its documents, raise the fractions, or leave it out with --domains.")


def existing_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of --tokenizer: a data-bin's spm.model, or a data-bin folder holding one."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise MoelabError(
            f"--tokenizer {path}: {file} does not exist. Give the {TOKENIZER_FILE} of the "
            f"data-bin the model was trained on (e.g. --tokenizer data-bin/mix/{TOKENIZER_FILE}), "
            "so that its token ids mean what the model learnt.")
    return Tokenizer.load(file)


def _present_splits(sources: dict[str, Corpus] | Corpus) -> list[str]:
    return list(SPLITS) if isinstance(sources, Corpus) else [s for s in SPLITS if s in sources]


def _encode_all(
    stream: Iterator[tuple[str, Document]],
    writers: dict[str, SplitWriter],
    domain_id: dict[str, int],
    model_proto: bytes,
    workers: int,
) -> None:
    """Encode documents in order with ``workers`` processes; only a few batches are in flight."""
    batches = _batched(stream, ENCODE_BATCH_DOCS)
    progress = tqdm(desc="encoding", unit=" docs")
    if workers == 1:
        _init_worker(model_proto)
        encoded = ((batch, _encode([d.text for _, d in batch])) for batch in batches)
        _write(encoded, writers, domain_id, progress)
        progress.close()
        return
    context = multiprocessing.get_context("spawn")  # no fork: torch may hold threads
    with context.Pool(workers, initializer=_init_worker, initargs=(model_proto,)) as pool:
        pending: list = []
        encoded_stream = _ordered_results(pool, batches, pending, window=workers * 4)
        _write(encoded_stream, writers, domain_id, progress)
    progress.close()


def _ordered_results(pool, batches, pending, window: int):
    for batch in batches:
        pending.append((batch, pool.apply_async(_encode, ([d.text for _, d in batch],))))
        if len(pending) >= window:
            batch0, result = pending.pop(0)
            yield batch0, result.get()
    while pending:
        batch0, result = pending.pop(0)
        yield batch0, result.get()


def _write(encoded, writers, domain_id, progress) -> None:
    for batch, ids_list in encoded:
        for (split, doc), ids in zip(batch, ids_list, strict=True):
            writers[split].add(doc, domain_id[doc.domain], ids)
        progress.update(len(batch))


def _meta(config, plan, tokenizer, dtype, split_stats, sources, started) -> dict:
    corpora = _corpora(sources)
    skipped = SkipLog()
    for corpus in corpora:
        skipped.merge(corpus.skipped)
    if isinstance(sources, Corpus):
        description = sources.description
    else:
        description = {split: c.description for split, c in sources.items()}
    return {
        "format": "moelab-data-bin",
        "format_version": 1,
        "created_by": f"moelab {__version__}",
        "domains": plan.domains,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": tokenizer.sha256,
        # where the tokenizer came from: None when it was trained on this corpus's train split
        "tokenizer_from": (str(Path(config.tokenizer).resolve())
                           if config.tokenizer is not None else None),
        # the train documents it was trained on (None with --tokenizer)
        "tokenizer_sample": plan.sample.summary() if config.tokenizer is None else None,
        "special_ids": {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID},
        "dtype": dtype.name,
        "splits": split_stats,
        "split_scheme": plan.scheme,
        "source": description,
        "shards": [f for corpus in corpora for f in corpus.files],
        "bundled_manifest": str(BUNDLED_DIR / "MANIFEST.json") if config.bundled else None,
        "skipped_files": skipped.paths,
        "skipped_documents": skipped.summary(),
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
