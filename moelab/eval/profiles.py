"""What each expert has learnt: its words, its surest documents and the domains it takes.

Every expert scores every token of a split with the sliding windows of evaluation (moelab.eval.lm:
tokens-per-sample T, context-window C, `<expert_z>` at position 0 of each window), so that
log p_z(x_t | x_<t) is known for every token t and expert z. From these:

**Words.** SentencePiece pieces are grouped into words: a word starts at a piece that begins with
the word-boundary mark "▁", at a "\\n" piece, after a "\\n" piece and at the document start; the
pieces up to the next start are its continuation (byte pieces and digits included). Its type is
its decoded text with surrounding whitespace stripped, so " the" and "the" after a newline are
one type, and punctuation stays attached ("end." is a type of its own). Whitespace-only words and
the end-of-document token are no words.

**Log-ratio** (c-BTM's "top terms", made a density ratio). For a word occurrence w = x_a..x_{b-1}
with context x_<a (the document's text before it):

    log p_z(w | x_<a)   = sum_{t=a}^{b-1} log p_z(x_t | x_<t)
    log p_mix(w | x_<a) = log sum_k pi_k p_k(w | x_<a)
    ratio_z(w)          = log p_z(w | x_<a) - log p_mix(w | x_<a)

with pi the prior at the document start, the one the mixture perplexity uses. The mixture weighs
the experts by pi, not by the posterior given x_<a: a few words into a document that posterior
sits on the document's own expert, so p_mix would equal p_z there and every expert's own words
would score about 0. With pi, ratio_z <= -log pi_z (log K under a uniform prior), reached when
only z gives the word any probability, and ratio_z < 0 where the others predict it better. A word
type's score is the mean of ratio_z over its occurrences in the split; types seen fewer than
`min_count` times are left out (one occurrence says little).

**Documents.** p(z | doc) ∝ pi_z p_z(doc), as in evaluation; each expert's documents of highest
posterior, with their domain and first characters.

**Domains.** Per expert and domain: the documents it wins (argmax posterior), their share of all
it wins, the share of its posterior mass sum_doc p(z | doc) that the domain holds, and its mean
posterior over the domain's documents (a column of the responsibilities matrix).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from moelab.data import BinarizedDataset, Chunk, Tokenizer
from moelab.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from moelab.eval.windows import resolve_window, window_token_log_probs
from moelab.model import MixtureLM

WORD_MARK = "\u2581"  # SentencePiece's word-boundary mark, the space before a word
# Tokens scored per group of documents: the per-token log-probabilities of a group (K x tokens,
# float64) are folded into the word counts and dropped, so memory does not grow with the split.
GROUP_TOKENS = 1 << 17


@dataclass
class ExpertProfiles:
    """The profiles of one model on one split; DataFrames to show, plot and export."""

    # every word type seen at least min_count times: occurrences and mean ratio_z per expert
    # (columns expert_k), indexed by the word
    word_scores: pd.DataFrame
    words: pd.DataFrame  # per expert its top words: expert, rank, word, log_ratio, occurrences
    documents: pd.DataFrame  # per expert its top documents: expert, rank, doc, domain, posterior,
    # text (the first characters, whitespace collapsed)
    # per expert and domain: won, won_share, mass_share, mean_responsibility
    domains: pd.DataFrame
    settings: dict = field(default_factory=dict)  # split, min_count, window, K, documents

    @property
    def num_experts(self) -> int:
        return int(self.settings["num_experts"])

    def table(self, *, top_words: int = 6) -> pd.DataFrame:
        """One row per expert: documents won, its main domain (largest share of its posterior
        mass), its top words and its surest document."""
        rows = {}
        for k in range(self.num_experts):
            domains = self.domains[self.domains["expert"] == k]
            main = domains.sort_values(["mass_share", "domain"], ascending=[False, True]).iloc[0]
            words = self.words[self.words["expert"] == k].head(top_words)
            surest = self.documents[self.documents["expert"] == k].head(1)
            rows[f"expert_{k}"] = {
                "documents won": int(domains["won"].sum()),
                "main domain": main["domain"],
                "its mass there": float(main["mass_share"]),
                "top words (mean log-ratio, nats)": ", ".join(
                    f"{w} ({r:+.2f})" for w, r in zip(words["word"], words["log_ratio"],
                                                      strict=True)),
                "surest document": (f"#{int(surest['doc'].iloc[0])} "
                                    f"({surest['domain'].iloc[0]}, "
                                    f"p={float(surest['posterior'].iloc[0]):.3f})"
                                    if len(surest) else ""),
            }
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "expert"
        return table


# ----------------------------------------------------------------------------- token scores


def token_log_probs(model: MixtureLM, dataset: BinarizedDataset, docs: list[int], *,
                    tokens_per_sample: int, context_window: int, max_sentences: int
                    ) -> dict[int, np.ndarray]:
    """log p_z(x_t | x_<t) of every token of `docs` under every expert -> {doc: (K, n) float64},
    from the sliding windows of evaluation (moelab.eval.windows.window_token_log_probs: each token
    scored once, by the window that scores it)."""
    lengths = [dataset.document_length(d) for d in docs]
    flat = window_token_log_probs(
        model, lengths, lambda i, start, end: dataset.chunk_tokens(Chunk(docs[i], start, end)),
        tokens_per_sample=tokens_per_sample, context_window=context_window,
        max_sentences=max_sentences, pad_id=dataset.pad_id)  # (N, K) float32
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return {d: flat[offsets[i] : offsets[i + 1]].T.astype(np.float64)
            for i, d in enumerate(docs)}


def _groups(dataset: BinarizedDataset, limit: int) -> Iterator[list[int]]:
    """Consecutive documents holding about `limit` tokens together (a long one alone)."""
    group, size = [], 0
    for d in range(len(dataset)):
        n = dataset.document_length(d)
        if group and size + n > limit:
            yield group
            group, size = [], 0
        group.append(d)
        size += n
    if group:
        yield group


# ----------------------------------------------------------------------------- words


class WordSplitter:
    """Token ids -> word spans (start, end) and their types, by the rule of the module docstring."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        self.starts = np.array([p.startswith(WORD_MARK) or p == "\n" for p in pieces])
        self.newline = np.array([p == "\n" for p in pieces])
        self.special = np.zeros(tokenizer.vocab_size, dtype=bool)
        self.special[[UNK_ID, BOS_ID, EOS_ID, PAD_ID]] = True
        self._types: dict[tuple[int, ...], str] = {}

    def spans(self, tokens: np.ndarray) -> list[tuple[int, int, str]]:
        """(start, end, word type) of every word of a document's tokens."""
        n = len(tokens)
        if n == 0:
            return []
        boundary = self.starts[tokens] | self.special[tokens]
        boundary[0] = True
        boundary[1:] |= self.newline[tokens[:-1]] | self.special[tokens[:-1]]
        starts = np.flatnonzero(boundary)
        out = []
        for a, b in zip(starts, [*starts[1:], n], strict=True):
            if self.special[tokens[a]]:
                continue
            key = tuple(int(t) for t in tokens[a:b])
            word = self._types.get(key)
            if word is None:
                word = self._types[key] = self.tokenizer.decode(key).strip()
            if word:
                out.append((int(a), int(b), word))
        return out


class _WordTotals:
    """Per word type: occurrences and the sum of ratio_z over them (K,)."""

    def __init__(self, K: int):
        self.index: dict[str, int] = {}
        self.sums = np.zeros((1024, K))
        self.counts = np.zeros(1024, dtype=np.int64)

    def add(self, words: list[str], ratios: np.ndarray) -> None:
        """ratios: (K, W), one column per word occurrence."""
        ids = np.array([self.index.setdefault(w, len(self.index)) for w in words], dtype=np.int64)
        if len(self.index) > len(self.counts):  # grow by doubling
            size = max(2 * len(self.counts), len(self.index))
            self.sums = np.vstack([self.sums, np.zeros((size - len(self.sums),
                                                        self.sums.shape[1]))])
            self.counts = np.concatenate([self.counts, np.zeros(size - len(self.counts),
                                                                dtype=np.int64)])
        np.add.at(self.sums, ids, ratios.T)
        np.add.at(self.counts, ids, 1)

    def frame(self, min_count: int) -> pd.DataFrame:
        n = len(self.index)
        words = np.array(list(self.index), dtype=object)
        counts, sums = self.counts[:n], self.sums[:n]
        keep = counts >= min_count
        means = sums[keep] / counts[keep][:, None]
        frame = pd.DataFrame(means, columns=[f"expert_{k}" for k in range(sums.shape[1])],
                             index=pd.Index(words[keep], name="word"))
        frame.insert(0, "occurrences", counts[keep])
        return frame


def word_log_ratios(cumulative: np.ndarray, log_pi: np.ndarray,
                    spans: list[tuple[int, int, str]]) -> np.ndarray:
    """ratio_z of each word occurrence (K, W). cumulative: (K, n + 1), sum_{s<t} log p_z(x_s)."""
    a = np.array([s[0] for s in spans], dtype=np.int64)
    b = np.array([s[1] for s in spans], dtype=np.int64)
    word = cumulative[:, b] - cumulative[:, a]  # (K, W) log p_z(w | x_<a)
    joint = log_pi[:, None] + word
    top = joint.max(0)
    mix = top + np.log(np.exp(joint - top).sum(0))  # (W,) log p_mix(w | x_<a)
    return word - mix[None, :]


# ----------------------------------------------------------------------------- profiles


def expert_profiles(model: MixtureLM, dataset: BinarizedDataset, tokenizer: Tokenizer, *,
                    tokens_per_sample: int | None = None, context_window: int = 0,
                    max_sentences: int = 8, min_count: int = 5, top_words: int = 10,
                    top_documents: int = 3, text_chars: int = 80,
                    progress: bool = False) -> ExpertProfiles:
    """Words, documents and domains of every expert on `dataset` (see the module docstring)."""
    if min_count < 1 or top_words < 1 or top_documents < 1:
        raise ValueError("min_count, top_words and top_documents must be >= 1")
    T, C = resolve_window(model, tokens_per_sample, context_window)
    D, K = len(dataset), model.num_experts
    if D == 0:
        raise ValueError(f"the {dataset.split} split has no documents to profile")
    log_pi = model.start_log_prior().numpy()  # (K,)
    splitter = WordSplitter(tokenizer)
    totals = _WordTotals(K)
    doc_ll = np.zeros((D, K))
    groups = list(_groups(dataset, GROUP_TOKENS))
    for docs in tqdm(groups, desc="profiles", unit="group", disable=not progress):
        scores = token_log_probs(model, dataset, docs, tokens_per_sample=T, context_window=C,
                                 max_sentences=max_sentences)
        for d, logp in scores.items():
            cumulative = np.concatenate([np.zeros((K, 1)), np.cumsum(logp, axis=1)], axis=1)
            doc_ll[d] = cumulative[:, -1]
            spans = splitter.spans(dataset.document(d))
            if spans:
                totals.add([s[2] for s in spans], word_log_ratios(cumulative, log_pi, spans))
    joint = doc_ll + log_pi[None, :]
    posterior = np.exp(joint - joint.max(1, keepdims=True))
    posterior /= posterior.sum(1, keepdims=True)  # (D, K) p(z | doc)
    domain_names = [dataset.domains[i] for i in np.asarray(dataset.domain_ids)]
    word_scores = totals.frame(min_count)
    return ExpertProfiles(
        word_scores=word_scores,
        words=top_word_table(word_scores, top_words),
        documents=top_document_table(posterior, domain_names, top_documents,
                                     lambda d: tokenizer.decode(dataset.document(d)),
                                     text_chars),
        domains=domain_table(posterior, domain_names),
        settings={"split": dataset.split, "min_count": min_count, "tokens_per_sample": T,
                  "context_window": C, "num_experts": K, "documents": D})


def top_word_table(word_scores: pd.DataFrame, top: int) -> pd.DataFrame:
    """Each expert's `top` word types by mean log-ratio (ties: more occurrences, then the word)."""
    rows = []
    experts = [c for c in word_scores.columns if c.startswith("expert_")]
    for k, column in enumerate(experts):
        ranked = pd.DataFrame({"word": word_scores.index, "log_ratio": word_scores[column].values,
                               "occurrences": word_scores["occurrences"].values})
        ranked = ranked.sort_values(["log_ratio", "occurrences", "word"],
                                    ascending=[False, False, True], kind="stable").head(top)
        for rank, row in enumerate(ranked.itertuples(index=False), start=1):
            rows.append({"expert": k, "rank": rank, "word": row.word,
                         "log_ratio": float(row.log_ratio), "occurrences": int(row.occurrences)})
    return pd.DataFrame(rows, columns=["expert", "rank", "word", "log_ratio", "occurrences"])


def top_document_table(posterior: np.ndarray, domains: list[str], top: int, text,
                       text_chars: int) -> pd.DataFrame:
    """Each expert's `top` documents by posterior (ties: the lower index), with their first
    `text_chars` characters (whitespace collapsed to single spaces, so a table row stays one
    line); `text(doc)` gives a document's text."""
    rows = []
    for k in range(posterior.shape[1]):
        order = sorted(range(len(posterior)), key=lambda d: (-posterior[d, k], d))[:top]
        for rank, d in enumerate(order, start=1):
            rows.append({"expert": k, "rank": rank, "doc": d, "domain": domains[d],
                         "posterior": float(posterior[d, k]),
                         "text": " ".join(text(d).split())[:text_chars]})
    return pd.DataFrame(rows, columns=["expert", "rank", "doc", "domain", "posterior", "text"])


def domain_table(posterior: np.ndarray, domains: list[str]) -> pd.DataFrame:
    """Per expert and domain (in the order domains first appear sorted): documents won, their
    share of the expert's wins (NaN if it wins none), the domain's share of the expert's
    posterior mass and the expert's mean posterior over the domain's documents."""
    names = np.asarray(domains)
    winner = posterior.argmax(1)
    rows = []
    for k in range(posterior.shape[1]):
        wins, mass = int((winner == k).sum()), float(posterior[:, k].sum())
        for name in sorted(set(domains)):
            mine = names == name
            won = int((winner[mine] == k).sum())
            rows.append({"expert": k, "domain": name, "won": won,
                         "won_share": won / wins if wins else float("nan"),
                         "mass_share": float(posterior[mine, k].sum()) / mass if mass else 0.0,
                         "mean_responsibility": float(posterior[mine, k].mean())})
    return pd.DataFrame(rows, columns=["expert", "domain", "won", "won_share", "mass_share",
                                       "mean_responsibility"])
