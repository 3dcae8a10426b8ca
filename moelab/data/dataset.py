"""A binarized split, memory-mapped: documents, their chunks, and each chunk's preceding context.

Nothing is read into memory beyond the per-document offsets and domain ids; token arrays are
``np.memmap`` views, so a data-bin of any size opens instantly. A split's chunks (``Chunks``) are
computed from the document lengths when asked for: a billion tokens make millions of chunks, and
nothing is stored per chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np

from moelab.data.preprocess import META_FILE
from moelab.data.tokenizer import Tokenizer
from moelab.errors import MoelabError


class Chunk(NamedTuple):
    doc: int  # document index within the split
    start: int  # first token (offset within the document)
    end: int  # one past the last token


class Chunks(Sequence[Chunk]):
    """A split's chunks, numbered in document order, each document's from its start: computed
    from the document lengths when asked for, never stored one by one.

    It keeps one int64 per document (where that document's chunks begin), so its memory follows
    the number of documents, not of chunks: a billion tokens make millions of chunks, and the
    training set must not cost a table row for each. Indexing with an int gives a Chunk; with a
    slice or an index array, a list of them. ``doc``, ``start``, ``end`` and ``lengths`` build an
    array over every chunk, for analysis and tests, not for training.
    """

    ITER_ROWS = 1 << 16  # chunks turned into Python tuples at a time while iterating

    def __init__(self, document_lengths: np.ndarray, tokens_per_sample: int):
        if tokens_per_sample < 1:
            raise ValueError(f"tokens_per_sample must be positive, got {tokens_per_sample}")
        self.tokens_per_sample = tokens_per_sample
        self.document_lengths = np.asarray(document_lengths, dtype=np.int64)  # (D,)
        per_doc = -(-self.document_lengths // tokens_per_sample)  # ceil: the last may be short
        self.first = np.zeros(len(per_doc) + 1, dtype=np.int64)  # (D + 1,) document d's chunks
        np.cumsum(per_doc, out=self.first[1:])  # are first[d] .. first[d + 1] - 1

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc, start, end) of the chunks numbered ``index`` (non-negative, in range)."""
        index = np.asarray(index, dtype=np.int64)
        doc = np.searchsorted(self.first, index, side="right") - 1
        start = (index - self.first[doc]) * self.tokens_per_sample
        end = np.minimum(start + self.tokens_per_sample, self.document_lengths[doc])
        return doc, start, end

    def short(self) -> tuple[np.ndarray, np.ndarray]:
        """(numbers, lengths) of the chunks shorter than tokens-per-sample, in number order:
        each document's last chunk where tokens-per-sample does not divide its length. Every
        other chunk is full, so these two arrays of at most one entry per document are all
        that batching by length needs to know."""
        tail = self.document_lengths % self.tokens_per_sample
        has = tail > 0
        return self.first[1:][has] - 1, tail[has]

    @property
    def doc(self) -> np.ndarray:
        return self.rows(np.arange(len(self)))[0]

    @property
    def start(self) -> np.ndarray:
        return self.rows(np.arange(len(self)))[1]

    @property
    def end(self) -> np.ndarray:
        return self.rows(np.arange(len(self)))[2]

    @property
    def lengths(self) -> np.ndarray:
        _, start, end = self.rows(np.arange(len(self)))
        return end - start

    def __len__(self) -> int:
        return int(self.first[-1])

    @overload
    def __getitem__(self, index: int) -> Chunk: ...

    @overload
    def __getitem__(self, index: slice | np.ndarray) -> list[Chunk]: ...

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            number = int(index) + len(self) if index < 0 else int(index)
            if not 0 <= number < len(self):
                raise IndexError(f"chunk {index} of {len(self)}")
            doc, start, end = (int(a[0]) for a in self.rows(np.array([number])))
            return Chunk(doc, start, end)
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        index = np.asarray(index, dtype=np.int64)
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"chunk index out of range for {len(self)} chunks")
        return [Chunk(*row) for row in zip(*(a.tolist() for a in self.rows(index)), strict=True)]

    def __iter__(self) -> Iterator[Chunk]:
        for first in range(0, len(self), self.ITER_ROWS):
            yield from self[np.arange(first, min(first + self.ITER_ROWS, len(self)))]

    def __repr__(self) -> str:
        return f"Chunks({len(self)} chunks of at most {self.tokens_per_sample} tokens)"


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise MoelabError(
            f"{data_dir} is not a moelab data-bin ({META_FILE} is missing); create one with "
            "`moelab preprocess --bundled --destdir DIR` or `moelab preprocess --data PATH ...`."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MoelabError(f"{path} is damaged ({e}); run `moelab preprocess` again.") from None
    _check_meta(meta, path)
    return meta


_META_KEYS = ("domains", "vocab_size", "tokenizer", "special_ids", "dtype", "splits")
_DTYPES = ("uint16", "uint32")  # what preprocess writes; anything else is not our file


def _check_meta(meta, path: Path) -> None:
    """The fields a dataset reads, with the types it expects: a damaged file is named, not a
    KeyError deep inside."""
    if not isinstance(meta, dict):
        raise MoelabError(f"{path} is damaged (not a JSON object); run `moelab preprocess` again.")
    missing = [k for k in _META_KEYS if k not in meta]
    problems = [f"lacks {', '.join(missing)}"] if missing else []
    if not missing:
        special = meta["special_ids"]
        splits = meta["splits"]
        if meta["dtype"] not in _DTYPES:
            problems.append(f"has token dtype {meta['dtype']!r} (expected one of {_DTYPES})")
        if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] < 1:
            problems.append(f"has vocab_size {meta['vocab_size']!r}")
        if not isinstance(meta["domains"], list) or not isinstance(meta["tokenizer"], str):
            problems.append("has a malformed domains list or tokenizer name")
        if not isinstance(special, dict) or not all(
                isinstance(special.get(k), int) for k in ("unk", "bos", "eos", "pad")):
            problems.append("has malformed special_ids")
        if not isinstance(splits, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("tokens"), int) and v["tokens"] >= 0
                and isinstance(v.get("documents"), int) and v["documents"] >= 0
                for v in splits.values()):
            problems.append("has malformed split counts")
    if problems:
        raise MoelabError(f"{path} {'; '.join(problems)}: it is damaged or not written by "
                          "`moelab preprocess`; run `moelab preprocess` again.")


class BinarizedDataset:
    """One split (train, valid or test) of a data-bin written by ``moelab preprocess``."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.split = split
        if split not in self.meta["splits"]:
            raise MoelabError(
                f"data-bin {self.data_dir} has no '{split}' split (it has "
                f"{sorted(self.meta['splits'])}); preprocess again with --{split}pref PATH, or use "
                "--data / --bundled which make all three."
            )
        self.domains: list[str] = list(self.meta["domains"])
        self.vocab_size: int = int(self.meta["vocab_size"])
        special = self.meta["special_ids"]
        self.unk_id, self.bos_id = int(special["unk"]), int(special["bos"])
        self.eos_id, self.pad_id = int(special["eos"]), int(special["pad"])
        documents = int(self.meta["splits"][split]["documents"])
        self.offsets = self._load_npy(f"{split}.offsets.npy", documents + 1)
        self.domain_ids = self._load_npy(f"{split}.domains.npy", documents)
        self.tokens = self._load_tokens()
        self._check_arrays()

    def _load_npy(self, name: str, expected: int) -> np.ndarray:
        """An int64 vector of `expected` entries (never unpickled: allow_pickle stays False)."""
        path = self.data_dir / name
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise MoelabError(
                f"{path} is missing or damaged ({e}); run `moelab preprocess` again."
            ) from None
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise MoelabError(f"{path} is missing or damaged (a {array.dtype} array of shape "
                              f"{array.shape}, not a vector of integers); run `moelab "
                              "preprocess` again.")
        if len(array) != expected:
            fewer = expected - len(array)
            count = f"{fewer} fewer" if fewer > 0 else f"{-fewer} more"
            raise MoelabError(
                f"{path} has {count} entries than {META_FILE} says ({len(array)} vs {expected}): "
                "the data-bin is incomplete or damaged; run `moelab preprocess` again.")
        return array

    def _check_arrays(self) -> None:
        """Offsets must rise from 0 and domain ids index the domain list, or reads go astray."""
        offsets = self.offsets
        bad_offsets = len(offsets) == 0 or offsets[0] != 0 or bool(np.any(np.diff(offsets) < 0))
        bad_domains = len(self.domain_ids) and (
            int(self.domain_ids.min()) < 0 or int(self.domain_ids.max()) >= len(self.domains))
        if bad_offsets or bad_domains:
            name = "offsets" if bad_offsets else "domains"
            raise MoelabError(
                f"{self.data_dir / f'{self.split}.{name}.npy'} is damaged (its values are out of "
                "order or range); run `moelab preprocess` again.")

    def _load_tokens(self) -> np.ndarray:
        path = self.data_dir / f"{self.split}.tokens.bin"
        expected = int(self.meta["splits"][self.split]["tokens"])
        dtype = np.dtype(self.meta["dtype"])
        actual = path.stat().st_size // dtype.itemsize if path.is_file() else -1
        if actual != expected or int(self.offsets[-1]) != expected:
            raise MoelabError(
                f"{path} holds {max(actual, 0)} tokens but {META_FILE} says {expected}: the "
                "data-bin is incomplete or damaged; run `moelab preprocess` again."
            )
        if expected == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return (
            f"BinarizedDataset({str(self.data_dir)!r}, {self.split!r}: {len(self)} documents, "
            f"{int(self.offsets[-1])} tokens, domains={self.domains})"
        )

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.data_dir / self.meta["tokenizer"])

    def document_length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def document(self, i: int) -> np.ndarray:
        """The document's tokens (ending with eos) as int64."""
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], dtype=np.int64)

    def chunks(self, tokens_per_sample: int) -> Chunks:
        """Consecutive pieces of each document, never crossing documents, none dropped: in
        document order, each document's from its start."""
        return Chunks(np.diff(np.asarray(self.offsets, dtype=np.int64)), tokens_per_sample)

    def chunk_tokens(self, chunk: Chunk) -> np.ndarray:
        base = int(self.offsets[chunk.doc])
        return np.asarray(self.tokens[base + chunk.start : base + chunk.end], dtype=np.int64)

    def context(self, chunk: Chunk, max_context: int) -> np.ndarray:
        """The document's tokens just before the chunk (at most the last ``max_context``)."""
        base = int(self.offsets[chunk.doc])
        first = max(0, chunk.start - max_context)
        return np.asarray(self.tokens[base + first : base + chunk.start], dtype=np.int64)
