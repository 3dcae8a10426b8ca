"""Corpora, the bundled corpus, the tokenizer, binarized datasets and batching.

Batching (which needs torch) is imported on first use, so the processes that `moelab preprocess`
spawns to encode text start without loading torch.
"""

from moelab.data.bundled import bundled_corpus, bundled_domains, manifest
from moelab.data.corpus import Corpus, Document, open_corpus
from moelab.data.dataset import BinarizedDataset, Chunk, Chunks, read_meta
from moelab.data.preprocess import PreprocessConfig, preprocess
from moelab.data.shards import open_data
from moelab.data.tokenizer import Tokenizer

_BATCHING = ("Batch", "TrainBatches", "batch_by_size", "batch_chunks_by_size", "collate")

__all__ = [
    *_BATCHING,
    "BinarizedDataset",
    "Chunk",
    "Chunks",
    "Corpus",
    "Document",
    "PreprocessConfig",
    "Tokenizer",
    "bundled_corpus",
    "bundled_domains",
    "manifest",
    "open_corpus",
    "open_data",
    "preprocess",
    "read_meta",
]


def __getattr__(name: str):
    if name in _BATCHING:
        from moelab.data import batching

        return getattr(batching, name)
    raise AttributeError(f"module 'moelab.data' has no attribute {name!r}")
