"""What the mixture's latent z ranges over at evaluation, and which prior weighs it.

`--latent` (docs/design.md section 3):
- `document` (the default): one z per document, log p(doc) = logsumexp_z [log pi_z +
  log p(doc | z)].
- `chunk`: every chunk of T = tokens-per-sample tokens (the document's chunks, as training cuts
  them) is its own mixture, weighed by the prior read from the text before it:
  log p(doc) = sum_chunks logsumexp_z [log p(z | context before the chunk) + log p(chunk | z,
  window context)]. The prior reads at most the T tokens before the chunk, as training does
  (max_context = tokens-per-sample); a uniform prior gives 1/K. At context-window 0 and the
  training's tokens-per-sample the windows are the training chunks, so this is the objective
  soft EM optimises (its validation loss).

`--prior`:
- `start` (the default): the model's own prior; at the document start (empty context) for the
  document latent, from each chunk's context for the chunk latent.
- `cached`: the mean posterior on the validation split, estimated with the model's own prior and
  the same latent, then used as a fixed prior for every document (every chunk, with the chunk
  latent) of the split evaluated, as DEMix does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moelab.clustering import logsumexp
from moelab.data import BinarizedDataset, Chunk, collate
from moelab.eval.windows import window_log_likelihoods, window_token_log_probs
from moelab.model import MixtureLM

PRIORS = ("start", "cached")
LATENTS = ("document", "chunk")
CACHED_FROM = "valid"  # the split a cached prior is estimated on


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"--{name} {value!r} is not known: choose {' or '.join(choices)}")


@torch.no_grad()
def chunk_log_priors(model: MixtureLM, dataset: BinarizedDataset, chunks: Sequence[Chunk], *,
                     max_context: int, batch_size: int = 64) -> np.ndarray:
    """log p(z | the document's last max_context tokens before the chunk), float64 (chunks, K)."""
    K = model.num_experts
    if model.gating is None:  # uniform: no need to read the contexts
        return np.full((len(chunks), K), -np.log(K))
    device = next(model.parameters()).device
    out = np.zeros((len(chunks), K))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(chunks), batch_size):
            batch = collate(dataset, list(chunks[i : i + batch_size]), max_context)
            prior = model.log_prior(batch.context.to(device), batch.context_lengths.to(device))
            out[i : i + len(prior)] = prior.double().cpu().numpy()  # (B, K)
    finally:
        model.train(was_training)
    return out


@dataclass
class ChunkScores:
    """The chunk latent's numbers for one split."""

    chunk_ll: np.ndarray  # (chunks, K) log p(chunk | z, window context)
    chunk_log_prior: np.ndarray  # (chunks, K) log p(z | context before the chunk), or cached
    chunk_docs: np.ndarray  # (chunks,) the document of each chunk
    chunk_tokens: np.ndarray  # (chunks,)

    @property
    def chunk_log_posterior(self) -> np.ndarray:
        joint = self.chunk_ll + self.chunk_log_prior
        return joint - logsumexp(joint)[:, None]  # (chunks, K)

    def document_mixture(self, num_documents: int) -> np.ndarray:
        """log p(doc) = sum over its chunks of logsumexp_z [prior + log p(chunk | z)], (D,)."""
        per_chunk = logsumexp(self.chunk_ll + self.chunk_log_prior)  # (chunks,)
        return np.bincount(self.chunk_docs, weights=per_chunk, minlength=num_documents)

    def document_posterior(self, num_documents: int) -> np.ndarray:
        """Each document's responsibilities: its chunks' posteriors averaged, weighed by their
        tokens (the share of its text each expert explains), (D, K)."""
        weighted = np.exp(self.chunk_log_posterior) * self.chunk_tokens[:, None]
        out = np.zeros((num_documents, weighted.shape[1]))
        np.add.at(out, self.chunk_docs, weighted)
        tokens = np.bincount(self.chunk_docs, weights=self.chunk_tokens, minlength=num_documents)
        return out / np.maximum(tokens, 1)[:, None]


def chunk_scores(model: MixtureLM, dataset: BinarizedDataset, token_log_probs: np.ndarray, *,
                 tokens_per_sample: int, log_prior: np.ndarray | None = None) -> ChunkScores:
    """The chunk latent from the per-token scores (moelab.eval.windows.window_token_log_probs of
    `dataset`, (N, K)): chunks of tokens_per_sample tokens, each weighed by the prior read from
    its context, or by `log_prior` (K,) (a cached prior) when given."""
    chunks = dataset.chunks(tokens_per_sample)
    base = np.asarray(dataset.offsets, dtype=np.int64)
    starts = np.asarray([base[c.doc] + c.start for c in chunks], dtype=np.int64)
    chunk_ll = np.add.reduceat(token_log_probs.astype(np.float64), starts, axis=0) if len(
        chunks) else np.zeros((0, model.num_experts))
    if log_prior is None:
        priors = chunk_log_priors(model, dataset, chunks, max_context=tokens_per_sample)
    else:
        priors = np.broadcast_to(np.asarray(log_prior, dtype=np.float64), chunk_ll.shape)
    return ChunkScores(chunk_ll=chunk_ll, chunk_log_prior=np.asarray(priors),
                       chunk_docs=np.asarray([c.doc for c in chunks], dtype=np.int64),
                       chunk_tokens=np.asarray([c.end - c.start for c in chunks], dtype=np.int64))


def cached_log_prior(model: MixtureLM, valid: BinarizedDataset, *, latent: str,
                     tokens_per_sample: int, context_window: int, max_sentences: int,
                     progress: bool = False) -> np.ndarray:
    """log of the mean posterior on `valid` (K,), the posterior taken with the model's own prior
    and `latent`: per document for the document latent, per chunk for the chunk latent."""
    check_choice("latent", latent, LATENTS)
    if len(valid) == 0:
        raise ValueError(f"--prior cached needs documents in the {valid.split} split of "
                         f"{valid.data_dir}, and it has none; use --prior start")
    lengths = np.diff(np.asarray(valid.offsets, dtype=np.int64))
    fetch = lambda d, s, e: valid.chunk_tokens(Chunk(d, s, e))  # noqa: E731
    window = dict(tokens_per_sample=tokens_per_sample, context_window=context_window,
                  max_sentences=max_sentences, pad_id=valid.pad_id, progress=progress)
    if latent == "document":
        joint = window_log_likelihoods(model, len(valid), lengths, fetch, **window).numpy() + \
            model.start_log_prior().numpy()[None, :]  # (D, K)
        log_posterior = joint - logsumexp(joint)[:, None]
    else:
        tokens = window_token_log_probs(model, lengths, fetch, **window)
        log_posterior = chunk_scores(model, valid, tokens,
                                     tokens_per_sample=tokens_per_sample).chunk_log_posterior
    with np.errstate(divide="ignore"):  # an expert no document uses gets a prior of 0
        return np.log(np.exp(log_posterior).mean(0))


def resolve_log_prior(model: MixtureLM, prior: str, prior_dataset: BinarizedDataset | None, *,
                      latent: str, tokens_per_sample: int, context_window: int,
                      max_sentences: int, progress: bool = False) -> np.ndarray | None:
    """The cached prior (K,) for `prior` = cached, estimated on `prior_dataset`; None for
    `start` (the model's own prior, read where the latent needs it)."""
    check_choice("prior", prior, PRIORS)
    if prior == "start":
        return None
    if prior_dataset is None:
        raise ValueError(f"--prior cached needs the {CACHED_FROM} split to estimate the prior "
                         f"on: pass prior_dataset (the {CACHED_FROM} split), or use --prior "
                         "start")
    return cached_log_prior(model, prior_dataset, latent=latent,
                            tokens_per_sample=tokens_per_sample, context_window=context_window,
                            max_sentences=max_sentences, progress=progress)
