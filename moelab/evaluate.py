"""Perplexity per method, responsibilities and cluster agreement: `moelab eval-lm` and `evaluate`.

Every document is scored by every expert with sliding windows, as fairseq-eval-lm does
(DESIGN.md section 3): windows of T = tokens-per-sample tokens with `<expert_z>` at position 0;
the first window scores its T tokens, each later one scores T - C new tokens after C tokens of
context (C = context-window). All K experts of a batch of windows run as one forward of B*K rows.

From the per-document log-likelihoods log p(doc | z) follow:
- `mixture`: log p(doc) = logsumexp_z [log pi_z + log p(doc | z)], pi the prior at the document
  start (empty context). The honest number.
- `oracle`: max_z log p(doc | z), the best single expert per document. A bound, not a density.
- `expert_k`: each expert alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from moelab.data import BinarizedDataset, Chunk
from moelab.model import MixtureLM

ORACLE_NOTE = ("oracle = the best single expert for each document, chosen by that document's own "
               "likelihood: a lower bound on perplexity, not a density")

# When a clustering's confidence says the posterior is flat (DESIGN.md section 3): its purity,
# NMI and ARI then come from argmaxes the model barely prefers, and are never a clean split.
# Below 0.9, on average over a tenth of each document's posterior mass sits on other experts: the
# argmax is a lean, not a decision (experts that really differ, scoring documents of hundreds of
# tokens, give ~1.0).
FLAT_MAX_POSTERIOR = 0.9
# Under 0.01 nats/token (experts' per-document perplexities scattered by ~1%) the experts are one
# model K times over: any split they make rides on noise, however sharp a long document's
# posterior looks.
FLAT_EXPERT_SPREAD = 0.01
CONFIDENCE_KEYS = ("mean_max_posterior", "mean_posterior_entropy", "expert_spread")

# ----------------------------------------------------------------------------- configuration


@dataclass
class EvalConfig:
    tokens_per_sample: int | None = None  # window length T; None: the model's max_seq_len
    context_window: int = 0  # C tokens of context before the T - C new tokens of later windows
    max_sentences: int = 8  # windows per batch (each becomes K rows)
    gen_subset: str = "test"  # split to evaluate

    def __post_init__(self) -> None:
        if self.tokens_per_sample is not None and self.tokens_per_sample < 1:
            raise ValueError(f"--tokens-per-sample must be >= 1, got {self.tokens_per_sample}")
        if self.context_window < 0:
            raise ValueError(f"--context-window must be >= 0, got {self.context_window}")
        if self.tokens_per_sample is not None and self.context_window >= self.tokens_per_sample:
            raise ValueError(
                f"--context-window ({self.context_window}) must be smaller than "
                f"--tokens-per-sample ({self.tokens_per_sample}): each window scores "
                "tokens-per-sample - context-window new tokens; e.g. --context-window "
                f"{self.tokens_per_sample // 2}")
        if self.max_sentences < 1:
            raise ValueError(f"--max-sentences must be >= 1, got {self.max_sentences}")
        if self.gen_subset not in ("train", "valid", "test"):
            raise ValueError(f"--gen-subset must be train, valid or test, got {self.gen_subset!r}")


def resolve_window(model: MixtureLM, tokens_per_sample: int | None, context_window: int
                   ) -> tuple[int, int]:
    """(T, C) checked against the model's context length."""
    limit = model.config.max_seq_len
    T = limit if tokens_per_sample is None else tokens_per_sample
    if not 1 <= T <= limit:
        raise ValueError(f"--tokens-per-sample {T} is longer than the model's context: it was "
                         f"trained with --tokens-per-sample {limit}; use {limit} or less")
    EvalConfig(tokens_per_sample=T, context_window=context_window)  # validates C < T
    return T, context_window


# ----------------------------------------------------------------------------- sliding windows


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


@torch.no_grad()
def window_log_likelihoods(
    model: MixtureLM,
    num_documents: int,
    lengths: Sequence[int],
    fetch: Callable[[int, int, int], np.ndarray],
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
    K = model.num_experts
    device = next(model.parameters()).device
    rows = [(doc, *w) for doc in range(num_documents)
            for w in windows(int(lengths[doc]), tokens_per_sample, context_window)]
    rows.sort(key=lambda r: r[3] - r[1], reverse=True)  # similar lengths together: little padding
    doc_ll = torch.zeros(num_documents, K, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()  # dropout off: scores are deterministic
    try:
        for i in tqdm(range(0, len(rows), max_sentences), desc="eval-lm", unit="batch",
                      disable=not progress, dynamic_ncols=True):
            batch = rows[i : i + max_sentences]
            B, L = len(batch), max(end - start for _, start, _, end in batch)
            tokens = torch.full((B, L), pad_id, dtype=torch.long)
            for b, (doc, start, _, end) in enumerate(batch):
                tokens[b, : end - start] = torch.from_numpy(np.asarray(fetch(doc, start, end)))
            tokens = tokens.to(device)
            lens = torch.tensor([end - start for _, start, _, end in batch], device=device)
            skip = torch.tensor([first - start for _, start, first, _ in batch], device=device)
            experts = torch.arange(K, device=device).repeat(B)  # (B*K,) row b*K + k: expert k
            # float32 on every device, even inside a caller's autocast: eval-lm's precision
            with torch.autocast(device.type, enabled=False):
                logp = model.token_log_probs(tokens.repeat_interleave(K, dim=0),
                                             lens.repeat_interleave(K, dim=0), experts)
            # (B*K, L)
            # context tokens of a later window were scored by an earlier one: mask them out
            scored = torch.arange(L, device=device)[None, :] >= skip[:, None]  # (B, L)
            ll = (logp.view(B, K, L) * scored[:, None, :]).sum(-1)  # (B, K)
            docs = torch.tensor([r[0] for r in batch], device=device)
            doc_ll.index_add_(0, docs, ll.double())
    finally:
        model.train(was_training)
    return doc_ll.cpu()


@torch.no_grad()
def start_log_prior(model: MixtureLM) -> torch.Tensor:
    """log pi_z at a document's start (empty context): -log K, or the gating net's own prior."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        empty = torch.zeros(1, 0, dtype=torch.long, device=device)
        return model.log_prior(empty, torch.zeros(1, dtype=torch.long, device=device))[0].double(
        ).cpu()  # (K,)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """Everything `evaluate` measures; DataFrames so notebooks can plot and export them."""

    perplexity: pd.DataFrame  # rows: overall + each domain; columns: mixture, oracle, expert_k
    documents: pd.DataFrame  # per document: domain, tokens, log-likelihoods (nats), winner
    posteriors: pd.DataFrame  # per document: p(z | doc) as columns expert_k
    responsibilities: pd.DataFrame  # domains x experts: mean posterior per domain
    # purity, nmi, ari of argmax posterior vs domain, and beside them its confidence:
    # mean_max_posterior, mean_posterior_entropy (nats), expert_spread (nats/token); all NaN
    # when the domains are unknown (no clustering to report)
    clusters: pd.Series
    usage: pd.DataFrame  # per expert: documents won, share
    summary: pd.Series  # documents, tokens, usage entropy, experts used, window settings
    log_prior: np.ndarray  # (K,) log pi_z at the document start
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        def table(df: pd.DataFrame) -> dict:
            return {str(k): {c: _plain(v) for c, v in row.items()} for k, row in df.iterrows()}

        return {
            "summary": {k: _plain(v) for k, v in self.summary.items()},
            "perplexity": table(self.perplexity),
            "responsibilities": table(self.responsibilities),
            "clusters": {k: _plain(v) for k, v in self.clusters.items()},
            "usage": table(self.usage),
            "log_prior": [float(x) for x in self.log_prior],
            "notes": [ORACLE_NOTE, *self.notes],
        }


def _plain(value):
    """numpy scalars -> Python; NaN -> None (JSON has no NaN)."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def evaluate(
    model: MixtureLM,
    dataset: BinarizedDataset,
    *,
    tokens_per_sample: int | None = None,
    context_window: int = 0,
    max_sentences: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Score every document of `dataset` with every expert and summarize (DESIGN.md section 3).

    tokens_per_sample defaults to the model's context length (max_seq_len).
    """
    T, C = resolve_window(model, tokens_per_sample, context_window)
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    D = len(dataset)
    if D == 0:
        raise ValueError(f"the {dataset.split} split has no documents to evaluate")
    lengths = np.diff(np.asarray(dataset.offsets, dtype=np.int64))
    ll = window_log_likelihoods(
        model, D, lengths, lambda d, s, e: dataset.chunk_tokens(Chunk(d, s, e)),
        tokens_per_sample=T, context_window=C, max_sentences=max_sentences,
        pad_id=dataset.pad_id, progress=progress,
    ).numpy()  # (D, K)
    log_pi = start_log_prior(model).numpy()  # (K,)
    return summarize(ll, log_pi, lengths, np.asarray(dataset.domain_ids, dtype=np.int64),
                     list(dataset.domains), tokens_per_sample=T, context_window=C)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def summarize(ll: np.ndarray, log_pi: np.ndarray, tokens: np.ndarray, domain_ids: np.ndarray,
              domains: list[str], *, tokens_per_sample: int, context_window: int) -> EvalResult:
    """Per-document log p(doc | z) (D, K) -> every table of EvalResult."""
    D, K = ll.shape
    experts = [f"expert_{k}" for k in range(K)]
    joint = ll + log_pi[None, :]  # (D, K) log pi_z + log p(doc | z)
    mixture = _logsumexp(joint)  # (D,)
    posterior = np.exp(joint - mixture[:, None])  # (D, K)
    winner = posterior.argmax(1)  # (D,)
    names = np.asarray([domains[i] if 0 <= i < len(domains) else str(i) for i in domain_ids])

    documents = pd.DataFrame({"domain": names, "tokens": tokens, "mixture": mixture,
                              "oracle": ll.max(1)}, index=pd.RangeIndex(D, name="doc"))
    for k, name in enumerate(experts):
        documents[name] = ll[:, k]
    documents["winner"] = winner
    posteriors = pd.DataFrame(posterior, columns=experts, index=documents.index)

    score_cols = ["mixture", "oracle", *experts]
    present = [d for d in domains if (names == d).any()]
    rows = {"overall": documents}
    rows.update({d: documents[documents["domain"] == d] for d in present})
    perplexity = pd.DataFrame({
        name: np.exp(-part[score_cols].sum() / part["tokens"].sum())
        for name, part in rows.items()
    }).T[score_cols]
    perplexity.index.name = "subset"

    responsibilities = posteriors.groupby(documents["domain"]).mean().reindex(present)
    responsibilities.index.name = "domain"

    notes = []
    known = domains != ["unknown"] and len(present) > 1
    if known:
        # sklearn takes 1.4 s to import: only where the metrics are computed
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        clusters = pd.Series({"purity": purity(domain_ids, winner),
                              "nmi": float(normalized_mutual_info_score(domain_ids, winner)),
                              "ari": float(adjusted_rand_score(domain_ids, winner)),
                              **posterior_confidence(ll, joint - mixture[:, None], tokens)},
                             name="argmax posterior vs domain")
        doubt = flat_posterior(clusters, K)
        if doubt:
            notes.append(doubt)
    else:
        clusters = pd.Series({"purity": np.nan, "nmi": np.nan, "ari": np.nan,
                              **dict.fromkeys(CONFIDENCE_KEYS, np.nan)},
                             name="argmax posterior vs domain")
        notes.append("cluster agreement (purity, NMI, ARI) needs known domains: this split has "
                     f"{'no domain labels' if domains == ['unknown'] else 'a single domain'}")

    won = np.bincount(winner, minlength=K)
    share = won / D
    usage = pd.DataFrame({"documents": won, "share": share}, index=pd.Index(experts, name="expert"))
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    summary = pd.Series({
        "documents": D, "tokens": int(tokens.sum()), "num_experts": K,
        "tokens_per_sample": tokens_per_sample, "context_window": context_window,
        "usage_entropy": entropy, "usage_entropy_max": math.log(K),
        "experts_used": int((share >= 1 / (4 * K)).sum()),
        "precision": "float32",  # window_log_likelihoods scores in float32 on every device
    })
    return EvalResult(perplexity=perplexity, documents=documents, posteriors=posteriors,
                      responsibilities=responsibilities, clusters=clusters, usage=usage,
                      summary=summary, log_prior=log_pi, notes=notes)


def posterior_confidence(ll: np.ndarray, log_posterior: np.ndarray, tokens: np.ndarray
                         ) -> dict[str, float]:
    """How sure the argmax posterior is, to read beside any clustering made from it.

    ll: (D, K) log p(doc | z); log_posterior: (D, K) log p(z | doc); tokens: (D,).
    - mean_max_posterior: mean over documents of max_z p(z | doc) (1/K: flat, 1: sure);
    - mean_posterior_entropy: mean over documents of -sum_z p log p, nats (log K: flat, 0: sure);
    - expert_spread: per document the standard deviation over the K experts of
      log p(doc | z) / tokens (nats per token), averaged over documents: how far the experts
      differ at all (0 for K = 1).
    """
    posterior = np.exp(log_posterior)
    plogp = np.where(posterior > 0, posterior * log_posterior, 0.0)  # 0 log 0 = 0
    per_token = ll / np.maximum(np.asarray(tokens, dtype=np.float64), 1.0)[:, None]
    return {"mean_max_posterior": float(posterior.max(1).mean()),
            "mean_posterior_entropy": float(-plogp.sum(1).mean()),
            "expert_spread": float(per_token.std(axis=1).mean())}


def flat_reasons(mean_max_posterior: float | None, expert_spread: float | None,
                 num_experts: int) -> list[str]:
    """Why a posterior is flat or unsure, by the FLAT_* thresholds; [] when it is sure, when a
    number is missing (None or NaN) or when K = 1 (no split to read)."""
    reasons = []
    if num_experts < 2:
        return reasons
    top, spread = mean_max_posterior, expert_spread
    if top is not None and top < FLAT_MAX_POSTERIOR:  # NaN compares False
        reasons.append(f"mean max posterior {top:.3f} < {FLAT_MAX_POSTERIOR}, flat at "
                       f"1/K = {1 / num_experts:.3f}")
    if spread is not None and spread < FLAT_EXPERT_SPREAD:
        reasons.append(f"the experts differ by {spread:.4f} nats/token < {FLAT_EXPERT_SPREAD}")
    return reasons


def flat_posterior(clusters: pd.Series | dict, num_experts: int) -> str | None:
    """Why a clustering must not be read as a clean split (a flat or unsure posterior, or experts
    that barely differ), or None when its confidence is high or not known (K = 1: no split)."""
    top = clusters.get("mean_max_posterior")
    reasons = flat_reasons(top, clusters.get("expert_spread"), num_experts)
    if not reasons:
        return None
    if top is not None and top < FLAT_MAX_POSTERIOR:
        head, why = "the posterior is flat or unsure", "the argmax barely prefers one expert"
    else:
        head, why = ("the experts barely differ", "the posterior is sure only because tiny "
                     "per-token differences add up over long documents")
    return (f"{head} ({'; '.join(reasons)}): {why}, so purity/NMI/ARI must not be read as a "
            "clean split of the domains")


def describe_clusters(result: EvalResult) -> str:
    """The clustering and its confidence, as `moelab eval-lm` prints them (with any warning)."""
    c, K = result.clusters, int(result.summary["num_experts"])
    if c[["purity", "nmi", "ari"]].isna().all():
        return "clusters: n/a (domains unknown)"
    lines = [f"clusters (argmax posterior vs domain): purity {c['purity']:.3f}  "
             f"NMI {c['nmi']:.3f}  ARI {c['ari']:.3f}",
             f"confidence: mean max posterior {c['mean_max_posterior']:.3f} (flat 1/K = "
             f"{1 / K:.3f})  mean posterior entropy {c['mean_posterior_entropy']:.3f} nats "
             f"(flat {math.log(K):.3f})  expert spread {c['expert_spread']:.4f} nats/token"]
    doubt = flat_posterior(c, K)
    if doubt:
        lines.append(f"warning: {doubt}")
    return "\n".join(lines)


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of documents whose cluster's most common label is their own label."""
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(labels[clusters == c]).max()
    return float(total / len(labels))


def format_result(result: EvalResult, title: str = "") -> str:
    """The readable report `moelab eval-lm` prints."""
    s = result.summary
    K = int(s["num_experts"])
    ppl = result.perplexity.rename(columns={"oracle": "oracle*"})
    lines = [
        title,
        f"{int(s['documents'])} documents, {int(s['tokens'])} tokens, K={K}, tokens-per-sample "
        f"{int(s['tokens_per_sample'])}, context-window {int(s['context_window'])}, "
        f"{s.get('precision', 'float32')}",
        "",
        "perplexity (mixture: the model's density; oracle*: best expert per document, a bound)",
        ppl.to_string(float_format=lambda x: f"{x:.2f}"),
        "",
        "responsibilities: mean posterior p(z | document) per domain",
        result.responsibilities.to_string(float_format=lambda x: f"{x:.3f}"),
        "",
    ]
    lines.append(describe_clusters(result))
    doubt = flat_posterior(result.clusters, K)  # printed beside the clusters, not again below
    shares = "  ".join(f"{k} {v:.3f}" for k, v in result.usage["share"].items())
    lines += [
        f"expert usage (share of documents won): {shares}",
        f"usage entropy {s['usage_entropy']:.3f} nats (max {s['usage_entropy_max']:.3f}); "
        f"experts used {int(s['experts_used'])}/{K} (winning >= 1/(4K) of documents)",
        "prior at document start: "
        + "  ".join(f"{math.exp(x):.3f}" for x in result.log_prior),
    ]
    lines += [f"note: {n}" for n in result.notes if n != doubt]
    return "\n".join(lines).strip("\n")


RESULT_FILES = ("perplexity", "documents", "posteriors", "responsibilities", "usage")


def write_results(result: EvalResult, results_dir: str | Path, split: str,
                  settings: dict | None = None) -> list[Path]:
    """CSV per table and one JSON, named `{split}_*`; other files in the folder are kept."""
    folder = Path(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in RESULT_FILES:
        path = folder / f"{split}_{name}.csv"
        getattr(result, name).to_csv(path)
        written.append(path)
    path = folder / f"{split}_eval.json"
    payload = {"split": split, "settings": settings or {}, **result.to_json()}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    written.append(path)
    return written
