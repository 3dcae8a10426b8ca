"""`moelab preprocess`: corpus -> SentencePiece BPE -> memory-mapped token arrays + meta.json.

With --tokenizer an existing SentencePiece model (a data-bin's spm.model) encodes the corpus
instead: no vocabulary is trained, the model is copied into the data-bin and meta.json records
where it came from, so a model trained on that data-bin can score this corpus (a new domain).

The corpus is streamed three times (keys for the split, train text for the tokenizer, then every
document for encoding) so memory stays flat whatever its size; tokens are appended to disk as they
are encoded. Output goes to a staging folder inside ``destdir`` and is moved into place only when
complete, so a failed run leaves no half-written data-bin and never touches the user's other files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moelab import __version__
from moelab.data.bundled import BUNDLED_DIR, bundled_corpus
from moelab.data.corpus import SPLITS, Corpus, Document, open_corpus, split_of_keys
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
    workers: int = 1  # processes encoding the splits
    force: bool = False  # write into an existing non-empty destdir (never deletes other files)

    def __post_init__(self) -> None:
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
    """Appends one split's documents to disk: tokens.bin (raw), offsets and domains (npy)."""

    folder: Path
    split: str
    dtype: np.dtype
    offsets: list[int] = field(default_factory=lambda: [0])
    domains: list[int] = field(default_factory=list)
    characters: int = 0

    def __post_init__(self) -> None:
        self.tokens_file = open(self.folder / f"{self.split}.tokens.bin", "wb")  # noqa: SIM115
        self.keys_file = open(self.folder / f"{self.split}.docs.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def add(self, doc: Document, domain_id: int, ids: list[int]) -> None:
        tokens = np.asarray([*ids, EOS_ID], dtype=self.dtype)
        tokens.tofile(self.tokens_file)
        self.offsets.append(self.offsets[-1] + len(tokens))
        self.domains.append(domain_id)
        self.characters += len(doc.text)
        self.keys_file.write(json.dumps({"key": doc.key, "domain": doc.domain}) + "\n")

    def close(self) -> dict:
        self.tokens_file.close()
        self.keys_file.close()
        np.save(self.folder / f"{self.split}.offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.folder / f"{self.split}.domains.npy", np.asarray(self.domains, dtype=np.int64))
        return {
            "documents": len(self.domains),
            "tokens": self.offsets[-1],
            "characters": self.characters,
        }


def _sources(config: PreprocessConfig) -> dict[str, Corpus] | Corpus:
    """Either one corpus to split by fractions, or one corpus per given split."""
    if config.bundled:
        return bundled_corpus()
    if config.data is not None:
        return open_corpus(config.data)
    given = {"train": config.trainpref, "valid": config.validpref, "test": config.testpref}
    return {split: open_corpus(path) for split, path in given.items() if path is not None}


def _documents_with_splits(
    sources: dict[str, Corpus] | Corpus, config: PreprocessConfig
) -> tuple[dict[str, list[str]], Iterator[tuple[str, Document]]]:
    """Scan keys once, then return the domain list and a re-openable (split, doc) stream."""
    if isinstance(sources, Corpus):
        keys_by_domain: dict[str, list[str]] = {}
        for doc in tqdm(sources, desc="scanning", unit=" docs", leave=False):
            keys_by_domain.setdefault(doc.domain, []).append(doc.key)
        assignment = split_of_keys(keys_by_domain, config.valid_fraction, config.test_fraction)

        def stream() -> Iterator[tuple[str, Document]]:
            for doc in sources:
                yield assignment[doc.key], doc

        return keys_by_domain, stream
    keys_by_domain = {}
    for corpus in sources.values():
        for doc in tqdm(corpus, desc="scanning", unit=" docs", leave=False):
            keys_by_domain.setdefault(doc.domain, []).append(doc.key)

    def stream() -> Iterator[tuple[str, Document]]:
        for split, corpus in sources.items():
            for doc in corpus:
                yield split, doc

    return keys_by_domain, stream


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
    keys_by_domain, stream = _documents_with_splits(sources, config)
    if not keys_by_domain:
        raise MoelabError("the input holds no documents (every file was empty or skipped).")
    domains = sorted(keys_by_domain)
    domain_id = {name: i for i, name in enumerate(domains)}

    if config.tokenizer is not None:
        model_proto = existing_tokenizer(config.tokenizer).model_proto
    else:
        train_texts = (doc.text for split, doc in stream() if split == "train")
        model_proto = train_tokenizer(train_texts, config.vocab_size, threads=config.workers)
    tokenizer = Tokenizer(model_proto)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32)

    destdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=destdir))
    try:
        (staging / TOKENIZER_FILE).write_bytes(model_proto)
        splits_present = _present_splits(sources)
        writers = {split: SplitWriter(staging, split, dtype) for split in splits_present}
        _encode_all(stream(), writers, domain_id, model_proto, config.workers)
        split_stats = {split: writer.close() for split, writer in writers.items()}
        meta = _meta(config, domains, tokenizer, dtype, split_stats, sources, started)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # meta.json last: its presence is what marks a data-bin complete (read_meta), so a run
        # killed between two renames leaves no meta.json beside missing token files
        for path in sorted(staging.iterdir(), key=lambda p: (p.name == META_FILE, p.name)):
            os.replace(path, destdir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if meta["skipped_files"]:
        shown = "; ".join(meta["skipped_files"][:5])
        warnings.warn(
            f"skipped {len(meta['skipped_files'])} file(s) that are empty or not UTF-8 text "
            f"(all listed in {destdir / META_FILE}): {shown}",
            stacklevel=2,
        )
    return meta


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


def _meta(config, domains, tokenizer, dtype, split_stats, sources, started) -> dict:
    if isinstance(sources, Corpus):
        skipped = sources.skipped.paths
        description = sources.description
    else:
        skipped = [p for c in sources.values() for p in c.skipped.paths]
        description = {split: c.description for split, c in sources.items()}
    return {
        "format": "moelab-data-bin",
        "format_version": 1,
        "created_by": f"moelab {__version__}",
        "domains": domains,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": tokenizer.sha256,
        # where the tokenizer came from: None when it was trained on this corpus's train split
        "tokenizer_from": (str(Path(config.tokenizer).resolve())
                           if config.tokenizer is not None else None),
        "special_ids": {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID, "pad": PAD_ID},
        "dtype": dtype.name,
        "splits": split_stats,
        "source": description,
        "bundled_manifest": str(BUNDLED_DIR / "MANIFEST.json") if config.bundled else None,
        "skipped_files": skipped,
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
