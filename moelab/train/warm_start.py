"""Warm start (--init-clusters tfidf): the experts' first assignment from document clusters.

EM from random weights tends to let one expert win everything early. c-BTM (Gururangan et al.
2023, "Scaling Expert Language Models with Unsupervised Domain Discovery") instead clusters the
training documents by tf-idf with balanced k-means and gives each expert one cluster. Here those
clusters choose the expert of every chunk for the first --init-updates updates (each chunk
trains its document's cluster's expert), then the E-step takes over.

The tf-idf terms are the data-bin's SentencePiece pieces, not decoded words: they are what the
model reads, they need no word-splitting rule that fits English only (the corpora hold code,
dictionary entries, gene ontology), and the token ids are read straight from the memory-mapped
split without decoding millions of tokens.

The clusters are written to the save dir (`CACHE_FILE`), so a resumed run reads the assignment
it started with instead of recomputing it (which a different BLAS or thread count could change).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from moelab.data import Batch, BinarizedDataset
from moelab.train.assignment import balanced_assignment

CACHE_FILE = "init_clusters.npz"
KMEANS_MAX_ITER = 50


def tfidf_vectors(ds: BinarizedDataset) -> sp.csr_matrix:
    """(documents, pieces) L2-normalized tf-idf rows of the split's documents (specials left
    out: every document ends with eos, which says nothing about its domain)."""
    # sklearn takes 1.4 s to import: only where the vectors are computed
    from sklearn.feature_extraction.text import TfidfVectorizer

    specials = np.array([ds.unk_id, ds.bos_id, ds.eos_id, ds.pad_id])

    def pieces(doc: np.ndarray) -> list[int]:
        return doc[~np.isin(doc, specials)].tolist()

    vectorizer = TfidfVectorizer(analyzer=pieces)  # smooth idf, l2 rows: deterministic
    return vectorizer.fit_transform(ds.document(i) for i in range(len(ds))).tocsr()


def balanced_kmeans(vectors: sp.csr_matrix | np.ndarray, k: int, *, seed: int,
                    max_iter: int = KMEANS_MAX_ITER) -> np.ndarray:
    """Spherical k-means with balanced assignments: (N, D) L2-normalized rows -> (N,) clusters
    of equal size (up to one). k-means++ seeding from `seed`; stops when nothing moves."""
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"balanced k-means needs 1 <= k <= {n} (the number of rows), got {k}")
    rng = np.random.default_rng(seed)
    centers = _kmeans_plus_plus(vectors, k, rng)  # (K, D)
    clusters = None
    for _ in range(max_iter):
        cost = 1.0 - np.asarray(vectors @ centers.T)  # (N, K) cosine distance
        new = balanced_assignment(cost)
        if clusters is not None and np.array_equal(new, clusters):
            break
        clusters = new
        centers = _centers(vectors, clusters, k)
    return clusters


def _kmeans_plus_plus(vectors, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows chosen as k-means++ does (each next one with probability ~ squared distance)."""
    n = vectors.shape[0]
    chosen = [int(rng.integers(n))]
    dist = np.full(n, np.inf)
    for _ in range(1, k):
        last = _dense_rows(vectors, [chosen[-1]])[0]
        dist = np.minimum(dist, np.maximum(2.0 - 2.0 * np.asarray(vectors @ last).ravel(), 0))
        total = dist.sum()
        if total > 0:
            p = dist / total
        else:  # every row equals a chosen one: any row not chosen yet will do
            p = np.isin(np.arange(n), chosen, invert=True) / (n - len(chosen))
        chosen.append(int(rng.choice(n, p=p)))
    return _dense_rows(vectors, chosen)


def _centers(vectors, clusters: np.ndarray, k: int) -> np.ndarray:
    """(K, D) normalized mean of each cluster's rows (the spherical k-means centroid)."""
    members = sp.csr_matrix((np.ones(len(clusters)), (clusters, np.arange(len(clusters)))),
                            shape=(k, len(clusters)))
    sums = members @ vectors  # (K, D)
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return sums / np.where(norms > 0, norms, 1.0)


def _dense_rows(vectors, rows: list[int]) -> np.ndarray:
    picked = vectors[rows]
    return picked.toarray() if sp.issparse(picked) else np.asarray(picked, dtype=float)


def cluster_documents(ds: BinarizedDataset, k: int, *, seed: int) -> np.ndarray:
    """(documents,) the balanced tf-idf cluster of each document of the split."""
    if len(ds) < k:
        raise ValueError(f"--init-clusters tfidf needs at least K = {k} train documents, one "
                         f"per expert; the train split has {len(ds)}")
    return balanced_kmeans(tfidf_vectors(ds), k, seed=seed)


def load_or_cluster(ds: BinarizedDataset, save_dir: Path, k: int, *, seed: int, write: bool,
                    say: Callable[[str], None]) -> np.ndarray:
    """The save dir's clusters when they were made for this data, K and seed; otherwise
    clustered now (and written there when `write`: rank 0 only)."""
    key = json.dumps({"method": "tfidf", "num_experts": k, "seed": seed, "documents": len(ds),
                      "tokens": int(ds.offsets[-1]),
                      "tokenizer_sha256": ds.meta.get("tokenizer_sha256")}, sort_keys=True)
    path = Path(save_dir) / CACHE_FILE
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["key"]) == key:
                return cached["clusters"]
        say(f"note: {path} was made for other data, K or seed: clustering again")
    clusters = cluster_documents(ds, k, seed=seed)
    if write:
        partial = path.with_name(path.name + f".tmp-{os.getpid()}")
        with open(partial, "wb") as f:
            np.savez(f, clusters=clusters, key=np.array(key))
        os.replace(partial, path)  # a kill while writing never leaves a half file
    return clusters


@dataclass
class WarmStart:
    """The document clusters that choose each chunk's expert during the first `updates`."""

    clusters: torch.Tensor  # (documents of the train split,) expert per document
    updates: int  # --init-updates

    def chooses(self, num_updates: int) -> bool:
        """Whether the clusters choose the experts of the update after `num_updates` done."""
        return num_updates < self.updates

    def assignment(self, batch: Batch) -> torch.Tensor:
        """(B,) the expert each chunk trains: its document's cluster."""
        return self.clusters.to(batch.doc_ids.device)[batch.doc_ids]
