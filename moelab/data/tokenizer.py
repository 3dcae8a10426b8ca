"""Lossless SentencePiece BPE: decode(encode(text)) == text, newlines and indentation included.

Losslessness comes from four settings: the identity normaliser (no NFKC, no whitespace
folding), no dummy prefix, byte fallback (any character outside the vocabulary becomes its UTF-8
bytes instead of <unk>), and "\n" as a piece of its own (SentencePiece trains on lines, so the
newline would otherwise never be learned).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from moelab.errors import MoelabError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Lines longer than this are cut into pieces for training only (SentencePiece skips longer
# "sentences"); encoding is never cut.
TRAIN_PIECE_CHARS = 4096
# SentencePiece learns from at most this many training lines, a uniform sample that moelab draws
# itself, seeded (SentencePiece's own sample is seeded anew in every process, whatever
# set_random_generator_seed says, so the same corpus would give another vocabulary each run).
MAX_TRAIN_LINES = 500_000
SAMPLE_BLOCK = 1 << 16  # lines offered to the sample per block of random draws
# No vocabulary is smaller: 4 special ids, 256 byte pieces, the space and "\n" (a corpus needs
# one more piece per other distinct character).
MIN_VOCAB = 4 + 256 + 2


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), TRAIN_PIECE_CHARS):
                yield line[start : start + TRAIN_PIECE_CHARS]


def sampled_lines(lines: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """Every line, in order, when there are at most ``max_lines``; else a uniform sample of
    ``max_lines`` of them drawn with ``seed`` (reservoir sampling, Algorithm R): the same lines
    for the same input and seed, in any process."""
    rng = np.random.default_rng([seed, max_lines])
    kept: list[str] = []
    offered = 0  # lines seen so far
    block: list[str] = []

    def offer(block: list[str]) -> None:
        nonlocal offered
        room = max_lines - len(kept)
        if room > 0:  # the reservoir is not full yet: these lines go in as they are
            kept.extend(block[:room])
            offered += min(room, len(block))
            block = block[room:]
        if not block:
            return
        # line number i (0-based) replaces slot j, drawn uniformly in [0, i], when j < max_lines
        numbers = offered + np.arange(len(block))
        slots = (rng.random(len(block)) * (numbers + 1)).astype(np.int64)
        for line, slot in zip(block, slots.tolist(), strict=True):
            if slot < max_lines:
                kept[slot] = line
        offered += len(block)

    for line in lines:
        block.append(line)
        if len(block) == SAMPLE_BLOCK:
            offer(block)
            block = []
    offer(block)
    return kept


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, threads: int = 1,
                    seed: int = 1) -> bytes:
    """Train SentencePiece BPE on ``texts`` (at most MAX_TRAIN_LINES of their lines, a sample
    seeded by ``seed``) and return the serialized model.

    Raises MoelabError naming the largest (or smallest) vocabulary that works when ``vocab_size``
    does not fit the corpus.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sampled_lines(training_lines(texts), MAX_TRAIN_LINES, seed)),
            model_writer=model,
            model_type="bpe",
            # below the floor SentencePiece fails with an internal error (vocab < 4) or a
            # count of the pieces this corpus needs (the one we want to report): ask for that
            vocab_size=max(vocab_size, MIN_VOCAB - 1),
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            # The space is always a piece: otherwise a train split without one (a tiny corpus)
            # byte-falls-back the "▁" SentencePiece writes for it, which decodes as "▁".
            required_chars="\u2581",
            character_coverage=0.9999,
            max_sentence_length=TRAIN_PIECE_CHARS * 4,  # bytes; a piece is at most 4 bytes a char
            # never reached, the lines being sampled above; both stay as they were, since they
            # are written into the model and a data-bin's tokenizer is known by its sha256
            input_sentence_size=MAX_TRAIN_LINES,
            shuffle_input_sentence=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            num_threads=max(1, threads),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _vocab_error(str(e), vocab_size) from None
    return model.getvalue()


def _vocab_error(message: str, vocab_size: int) -> Exception:
    too_high = re.search(r"value <= (\d+)", message)
    if too_high:
        return MoelabError(
            f"--nwordssrc {vocab_size} is larger than this corpus supports: the largest "
            f"SentencePiece vocabulary its train split allows is {too_high.group(1)}. "
            f"Use --nwordssrc {too_high.group(1)} or less, or bring more training text."
        )
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        smallest = int(too_low.group(1))  # "V vs N": N pieces are needed, N works
        return MoelabError(
            f"--nwordssrc {vocab_size} is too small: the corpus needs at least {smallest} "
            "pieces (special tokens, 256 byte pieces and its characters). Use a larger value."
        )
    if "sentence" in message.lower() and "empty" in message.lower():
        return MoelabError("the train split holds no text to train the tokenizer on.")
    return MoelabError(f"SentencePiece training failed: {message}")


class Tokenizer:
    """A thin wrapper that fixes the special ids and the lossless round trip in one place."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        if (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()) != (
            UNK_ID, BOS_ID, EOS_ID, PAD_ID,
        ):
            raise MoelabError("this SentencePiece model was not made by `moelab preprocess`.")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise MoelabError(
                f"tokenizer model {path} is missing; run `moelab preprocess` again to recreate "
                "the data-bin."
            )
        try:
            return cls(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise MoelabError(f"{path} is not a readable SentencePiece model ({e}).") from None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        try:
            return self.sp.encode(text)
        except RuntimeError:  # SentencePiece cannot take a str that is not valid Unicode
            return self.sp.encode(_valid_unicode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            return self.sp.encode(texts)
        except (RuntimeError, TypeError):  # a list with an invalid str raises TypeError
            return self.sp.encode([_valid_unicode(t) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        # Special ids (eos, pad, expert tokens beyond the vocabulary) are not text.
        special, size = (UNK_ID, BOS_ID, EOS_ID, PAD_ID), self.vocab_size
        return self.sp.decode([i for i in ids if i not in special and 0 <= i < size])


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    """Lone surrogates (a JSON "\\ud800" escape, undecodable bytes of a command-line argument)
    cannot be UTF-8 encoded: they become U+FFFD, as a UTF-8 decoder would show them."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _SURROGATE.sub("\ufffd", text)
