"""Sliding windows over documents, and the batched forwards that score them with chosen experts.

fairseq-eval-lm's windows (docs/design.md section 3): windows of T = tokens-per-sample tokens with
`<expert_z>` at position 0; the first window scores its T tokens, each later one scores T - C
new tokens after C tokens of context (C = context-window). Every token is scored exactly once.

A row is one window of one document, `(doc, start, first_scored, end)`, scored by a set of
experts of the same size for every row of a call: all K for a full evaluation, K' chosen ones
for routed inference (moelab.eval.routing). A batch of B rows runs its B * k expert rows as one
forward. Truncating a window at the end (scoring a prefix) leaves the log-probabilities of the
tokens it keeps unchanged, since the model is causal; that is what lets a routed evaluation score
a prefix with every expert and the rest of the same window with a few, and get the very numbers
of the full evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from moelab.model import MixtureLM

Row = tuple[int, int, int, int]  # (doc, start, first_scored, end): tokens [start, end) are read
Fetch = Callable[[int, int, int], np.ndarray]  # (doc, start, end) -> the tokens [start, end)


def windows(length: int, tokens_per_sample: int, context_window: int
            ) -> list[tuple[int, int, int]]:
    """(start, first_scored, end) for a document of `length` tokens.

    The window holds tokens [start, end) (at most T); its targets [first_scored, end) are
    scored, the ones before are context. Every token is scored exactly once.
    """
    T, C = tokens_per_sample, context_window
    if length <= 0:
        return []
    out = [(0, 0, min(T, length))]
    new = out[0][2]
    while new < length:
        end = min(new + T - C, length)
        out.append((new - C, new, end))
        new = end
    return out


def resolve_window(model: MixtureLM, tokens_per_sample: int | None, context_window: int
                   ) -> tuple[int, int]:
    """(T, C) checked against the model's context length; T None: the model's max_seq_len."""
    limit = model.config.max_seq_len
    T = limit if tokens_per_sample is None else tokens_per_sample
    if not 1 <= T <= limit:
        raise ValueError(f"--tokens-per-sample {T} is longer than the model's context: it was "
                         f"trained with --tokens-per-sample {limit}; use {limit} or less")
    if context_window < 0:
        raise ValueError(f"--context-window must be >= 0, got {context_window}")
    if context_window >= T:
        raise ValueError(
            f"--context-window ({context_window}) must be smaller than --tokens-per-sample "
            f"({T}): each window scores tokens-per-sample - context-window new tokens; e.g. "
            f"--context-window {T // 2}")
    return T, context_window


def document_rows(lengths: Sequence[int], tokens_per_sample: int, context_window: int,
                  docs: Sequence[int] | None = None) -> list[Row]:
    """Every window of the documents `docs` (default: all) as rows."""
    docs = range(len(lengths)) if docs is None else docs
    return [(int(d), *w) for d in docs
            for w in windows(int(lengths[d]), tokens_per_sample, context_window)]


def expert_forwards(rows: Sequence[Row], experts_per_row: int) -> int:
    """Token positions run through the Transformer, one per expert: what a scoring pass costs
    (context positions of a window count: they are computed, though not scored)."""
    return experts_per_row * sum(end - start for _, start, _, end in rows)


@torch.no_grad()
def score_rows(
    model: MixtureLM,
    rows: Sequence[Row],
    experts: torch.Tensor,
    fetch: Fetch,
    *,
    max_sentences: int,
    pad_id: int,
    progress: bool = False,
    desc: str = "eval-lm",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Score `rows` with row r's experts `experts[r]` ((R, k) indices); batches of max_sentences
    rows, each one forward of B * k rows.

    Yields (the batch's indices into `rows`, log p(x_t | window, z) float32 (B, k, L) with 0 at
    padding and at context positions), position j of batch row b being token start_b + j.
    Dropout is off while scoring and the model's mode is restored afterwards.
    """
    device = next(model.parameters()).device
    k = experts.shape[1]
    order = sorted(range(len(rows)), key=lambda r: rows[r][3] - rows[r][1], reverse=True)
    was_training = model.training
    model.eval()  # dropout off: scores are deterministic
    try:
        for i in tqdm(range(0, len(order), max_sentences), desc=desc, unit="batch",
                      disable=not progress, dynamic_ncols=True):
            batch = order[i : i + max_sentences]  # similar lengths together: little padding
            B = len(batch)
            L = max(rows[r][3] - rows[r][1] for r in batch)
            tokens = torch.full((B, L), pad_id, dtype=torch.long)
            for b, r in enumerate(batch):
                doc, start, _, end = rows[r]
                tokens[b, : end - start] = torch.from_numpy(np.asarray(fetch(doc, start, end)))
            tokens = tokens.to(device)
            lens = torch.tensor([rows[r][3] - rows[r][1] for r in batch], device=device)
            skip = torch.tensor([rows[r][2] - rows[r][1] for r in batch], device=device)
            chosen = experts[batch].to(device).reshape(-1)  # (B*k,) row b*k + j: expert j of b
            # float32 on every device, even inside a caller's autocast: eval-lm's precision
            with torch.autocast(device.type, enabled=False):
                logp = model.token_log_probs(tokens.repeat_interleave(k, dim=0),
                                             lens.repeat_interleave(k, dim=0), chosen)
            # (B*k, L); context tokens of a later window were scored by an earlier one
            scored = torch.arange(L, device=device)[None, :] >= skip[:, None]  # (B, L)
            yield batch, logp.view(B, k, L) * scored[:, None, :]
    finally:
        model.train(was_training)


def all_experts(model: MixtureLM, num_rows: int) -> torch.Tensor:
    """(R, K): every row scored by every expert."""
    return torch.arange(model.num_experts).repeat(num_rows, 1)


@torch.no_grad()
def window_log_likelihoods(
    model: MixtureLM,
    num_documents: int,
    lengths: Sequence[int],
    fetch: Fetch,
    *,
    tokens_per_sample: int,
    context_window: int,
    max_sentences: int,
    pad_id: int,
    progress: bool = False,
) -> torch.Tensor:
    """log p(doc | z) for every document and expert, float64 (D, K), from sliding windows.

    `fetch(doc, start, end)` returns the document's tokens [start, end). Windows are batched by
    length (max_sentences per batch) and each batch runs all K experts as B*K rows.
    """
    rows = document_rows(lengths[:num_documents], tokens_per_sample, context_window)
    doc_ll = torch.zeros(num_documents, model.num_experts, dtype=torch.float64)
    for batch, logp in score_rows(model, rows, all_experts(model, len(rows)), fetch,
                                  max_sentences=max_sentences, pad_id=pad_id, progress=progress):
        docs = torch.tensor([rows[r][0] for r in batch])
        doc_ll.index_add_(0, docs, logp.sum(-1).double().cpu())  # (B, K)
    return doc_ll


@torch.no_grad()
def window_token_log_probs(
    model: MixtureLM,
    lengths: Sequence[int],
    fetch: Fetch,
    *,
    tokens_per_sample: int,
    context_window: int,
    max_sentences: int,
    pad_id: int,
    progress: bool = False,
) -> np.ndarray:
    """log p(x_t | window, z) of every token and expert, float32 (N, K), N = sum(lengths):
    document d's tokens are rows offsets[d]:offsets[d + 1], offsets = [0, *cumsum(lengths)].

    The per-token scores behind window_log_likelihoods: their cumulative sums give a prefix's
    likelihood for every prefix length at once, and their sums per chunk a chunk's.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rows = document_rows(lengths, tokens_per_sample, context_window)
    out = np.zeros((int(offsets[-1]), model.num_experts), dtype=np.float32)
    for batch, logp in score_rows(model, rows, all_experts(model, len(rows)), fetch,
                                  max_sentences=max_sentences, pad_id=pad_id, progress=progress):
        logp = logp.cpu().numpy()  # (B, K, L)
        for b, r in enumerate(batch):
            doc, start, first, end = rows[r]
            base = offsets[doc]
            out[base + first : base + end] = logp[b, :, first - start : end - start].T
    return out
