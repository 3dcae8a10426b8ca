"""The train documents SentencePiece learns from: a bounded, seeded sample, chosen by key hash.

SentencePiece holds its training text in memory, so on a large corpus it must see a sample. The
sample is the longest prefix of the train documents ranked by a seeded hash of their keys whose
text fits in ``max_bytes``: deterministic, independent of reading order, and found in one pass
that keeps only (hash, size) pairs of the documents inside the budget, never their text. The
tokenizer pass then streams the corpus again and keeps the documents below the cut, in reading
order; when the whole train split fits, it keeps every document, as before there was a budget.
"""

from __future__ import annotations

import heapq
import math

from moelab.data.corpus import key_hash
from moelab.errors import MoelabError


class TokenizerSample:
    """Offered every train document once (key, UTF-8 size); then says which ones to keep."""

    def __init__(self, max_bytes: int, seed: int):
        if max_bytes < 1:
            raise MoelabError(f"--spm-sample-bytes must be positive, got {max_bytes}.")
        self.max_bytes, self.salt = max_bytes, f"{seed}\0"
        self._kept: list[tuple[float, int]] = []  # max-heap of (-hash, bytes) inside the budget
        self.kept_bytes = 0
        self.offered_documents = self.offered_bytes = 0
        self.cut = math.inf  # documents whose hash is below the cut are in the sample

    def offer(self, key: str, size: int) -> None:
        self.offered_documents += 1
        self.offered_bytes += size
        rank = key_hash(key, self.salt)
        if rank >= self.cut:
            return
        heapq.heappush(self._kept, (-rank, size))
        self.kept_bytes += size
        while self.kept_bytes > self.max_bytes:
            negative_rank, dropped = heapq.heappop(self._kept)
            self.kept_bytes -= dropped
            self.cut = -negative_rank

    def keeps(self, key: str) -> bool:
        return self.cut == math.inf or key_hash(key, self.salt) < self.cut

    @property
    def kept_documents(self) -> int:
        return len(self._kept)

    def check(self) -> None:
        if self.offered_documents and not self._kept:
            raise MoelabError(
                f"--spm-sample-bytes {self.max_bytes} is smaller than the train document the "
                "sample starts with; raise it.")

    def summary(self) -> dict:
        """The sample as meta.json records it."""
        return {"max_bytes": self.max_bytes, "documents": self.kept_documents,
                "bytes": self.kept_bytes, "train_documents": self.offered_documents,
                "train_bytes": self.offered_bytes}
