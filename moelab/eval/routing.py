"""Routed inference: the posterior after a prefix of M tokens picks K' experts to score the rest.

`--routing full | prefix:M | topk:K' | prefix:M,topk:K'` (prefix:M alone: K' = 1; topk:K'
alone: M = 0, the experts ranked by the prior alone, a static choice per split; with
--prior cached that is DEMix's most used experts). For a document x_1..x_n with n > M:

- prefix posterior: p(z | x_<=M) ∝ pi_z p(x_1..M | z), pi the prior (--prior);
- the chosen experts S: the K' largest prefix posteriors (ties: the lower expert index);
- routed: log p_S(x_M+1..n | x_<=M) = log sum_{z in S} w_z p(x_M+1..n | x_<=M, z), with w the
  prefix posterior renormalised over S (K' = 1: that expert's own conditional);
- the full mixture on the same tokens: log p(x_M+1..n | x_<=M) = logsumexp_z [log pi_z +
  log p(x_1..n | z)] - logsumexp_z [log pi_z + log p(x_1..M | z)];
- routing accuracy: the top-1 choice is the argmax of the full-document posterior p(z | x_1..n)
  (the document's winner in eval-lm's tables); winner_in_chosen: that winner is in S;
- cost: expert forwards (token positions run through the Transformer, once per expert) per token
  of the routed documents, counted from the windows each pass really runs: the full pass runs
  every window with all K experts; the routed pass runs the windows' parts before M with all K,
  then the windows that reach past M with the K' chosen ones (a window that straddles M is read
  again from its start, so that every token keeps the context it has in the full pass).

Two token sets, each named where it is used: the perplexities, gap and `tokens` are over the
tokens after the prefix (the only ones routing can change); the cost, expert forwards per token
and tokens/s, is over every token of the documents a pass reads, prefix included (the routed pass
must read the prefix with all K experts to choose), so full scoring costs K forwards per token
and routing about K' + (K - K') M / n.

p(. | z) are eval-lm's sliding-window scores (moelab.eval.windows), so the routed pass gives each
token the log-probability the full pass gives it. Documents of M tokens or fewer have no tokens
to route: they are left out of every routed figure and counted (`short_documents`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from moelab.clustering import logsumexp
from moelab.data import BinarizedDataset, Chunk
from moelab.eval.latents import resolve_log_prior
from moelab.eval.windows import (
    Fetch,
    Row,
    all_experts,
    document_rows,
    expert_forwards,
    resolve_window,
    score_rows,
    window_token_log_probs,
)
from moelab.model import MixtureLM

SCHEMES = "full, prefix:M, topk:K' or prefix:M,topk:K' (e.g. prefix:32,topk:2)"


@dataclass(frozen=True)
class Routing:
    """Which experts score a document after its first `prefix` tokens."""

    prefix: int = 0  # M: tokens every expert reads before the choice; 0: choose by the prior
    top_k: int = 1  # K': experts kept after the prefix

    def __post_init__(self) -> None:
        if self.prefix < 0:
            raise ValueError(f"--routing: the prefix must be >= 0 tokens, got {self.prefix}")
        if self.top_k < 1:
            raise ValueError(f"--routing topk:{self.top_k}: keep at least one expert (K' >= 1); "
                             "use topk:1 or more")

    def check(self, num_experts: int) -> None:
        if self.top_k > num_experts:
            raise ValueError(f"--routing {self}: K' = {self.top_k} is more experts than the "
                             f"model has (K = {num_experts}); use topk:{num_experts} or less")

    def __str__(self) -> str:
        parts = ([f"prefix:{self.prefix}"] if self.prefix else []) + (
            [f"topk:{self.top_k}"] if self.top_k != 1 or not self.prefix else [])
        return ",".join(parts)


def parse_routing(text: str | Routing | None) -> Routing | None:
    """`--routing`'s value -> a Routing, or None for `full` (every expert scores every token)."""
    if text is None or isinstance(text, Routing):
        return text
    text = str(text).strip()
    if text == "full":
        return None
    values: dict[str, int] = {}
    if "full" in text.split(","):
        raise ValueError(f"--routing {text!r}: full scores every token with every expert and "
                         f"takes no prefix or topk; use {SCHEMES}")
    for part in text.split(","):
        match = re.fullmatch(r"\s*([a-z]+)\s*:\s*(-?\d+)\s*", part)
        if not match or match[1] not in ("prefix", "topk"):
            raise ValueError(f"--routing {text!r}: {part.strip()!r} is not a routing scheme; "
                             f"use {SCHEMES}")
        if match[1] in values:
            raise ValueError(f"--routing {text!r} gives {match[1]} twice; use {SCHEMES}")
        values[match[1]] = int(match[2])
    if "prefix" in values and values["prefix"] < 1:
        raise ValueError(f"--routing prefix:{values['prefix']}: the prefix must hold at least "
                         "one token (M >= 1); to rank the experts by the prior alone, give "
                         "topk:K' without a prefix")
    return Routing(prefix=values.get("prefix", 0), top_k=values.get("topk", 1))


# ----------------------------------------------------------------------------- the formulas


def choose_experts(log_prior: np.ndarray, prefix_ll: np.ndarray, top_k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The K' experts of largest prefix posterior (D, K') and their renormalised log weights
    (D, K'); prefix_ll (D, K) = log p(x_1..M | z), log_prior (K,)."""
    joint = prefix_ll + log_prior[None, :]  # (D, K) log pi_z + log p(x_<=M | z)
    chosen = np.argsort(-joint, axis=1, kind="stable")[:, :top_k]  # ties: lower index first
    picked = np.take_along_axis(joint, chosen, axis=1)  # (D, K')
    return chosen, picked - logsumexp(picked)[:, None]


def routed_log_likelihood(log_weights: np.ndarray, rest_ll: np.ndarray) -> np.ndarray:
    """log sum_{z in S} w_z p(rest | prefix, z), (D,); both arguments (D, K')."""
    return logsumexp(log_weights + rest_ll)


def full_after_prefix(log_prior: np.ndarray, prefix_ll: np.ndarray, doc_ll: np.ndarray
                      ) -> np.ndarray:
    """The full mixture's log p(x_M+1..n | x_<=M), (D,): log p(x_1..n) - log p(x_1..M)."""
    return logsumexp(doc_ll + log_prior[None, :]) - logsumexp(prefix_ll + log_prior[None, :])


# ----------------------------------------------------------------------------- the routed pass


def routed_docs(lengths: np.ndarray, routing: Routing) -> np.ndarray:
    """The documents with tokens after the prefix (n > M)."""
    return np.flatnonzero(np.asarray(lengths) > routing.prefix)


def prefix_rows(lengths: np.ndarray, docs: Sequence[int], prefix: int, tokens_per_sample: int,
                context_window: int) -> list[Row]:
    """The windows' parts before M: every window that scores a token < M, cut at M."""
    return [(d, s, f, min(e, prefix)) for d, s, f, e in
            document_rows(lengths, tokens_per_sample, context_window, docs) if f < prefix]


def rest_rows(lengths: np.ndarray, docs: Sequence[int], prefix: int, tokens_per_sample: int,
              context_window: int) -> list[Row]:
    """The windows that score tokens >= M, read from their own start, scored from M on."""
    return [(d, s, max(f, prefix), e) for d, s, f, e in
            document_rows(lengths, tokens_per_sample, context_window, docs) if e > prefix]


def forwards(lengths: np.ndarray, routing: Routing, num_experts: int, tokens_per_sample: int,
             context_window: int) -> tuple[int, int, int]:
    """(full pass, routed pass, tokens) over the routed documents: expert forwards each pass runs
    and the tokens they score."""
    docs = routed_docs(lengths, routing)
    window = (tokens_per_sample, context_window)
    full = expert_forwards(document_rows(lengths, *window, docs), num_experts)
    routed = (expert_forwards(prefix_rows(lengths, docs, routing.prefix, *window), num_experts)
              + expert_forwards(rest_rows(lengths, docs, routing.prefix, *window),
                                routing.top_k))
    return full, routed, int(np.asarray(lengths)[docs].sum())


@dataclass
class RoutedScores:
    """What the routed pass measured, per routed document."""

    routing: Routing
    docs: np.ndarray  # (R,) document indices (n > M)
    prefix_ll: np.ndarray  # (R, K) log p(x_1..M | z), every expert
    chosen: np.ndarray  # (R, K') the chosen experts, best first
    log_weights: np.ndarray  # (R, K') renormalised prefix posterior of the chosen
    rest_ll: np.ndarray  # (R, K') log p(x_M+1..n | x_<=M, z) of the chosen experts only
    forwards: int  # expert forwards the pass ran

    @property
    def routed_ll(self) -> np.ndarray:
        return routed_log_likelihood(self.log_weights, self.rest_ll)  # (R,)


def routed_scores(model: MixtureLM, lengths: Sequence[int], fetch: Fetch,
                  log_prior: np.ndarray, routing: Routing, *, tokens_per_sample: int,
                  context_window: int, max_sentences: int, pad_id: int,
                  progress: bool = False) -> RoutedScores:
    """Score the prefixes with all K experts, choose, then the rest with the K' chosen only."""
    K = model.num_experts
    routing.check(K)
    lengths = np.asarray(lengths, dtype=np.int64)
    docs = routed_docs(lengths, routing)
    where = np.full(len(lengths), -1, dtype=np.int64)
    where[docs] = np.arange(len(docs))  # document -> its row in the results
    window = (tokens_per_sample, context_window)
    scoring = dict(max_sentences=max_sentences, pad_id=pad_id, progress=progress)

    prefix = prefix_rows(lengths, docs, routing.prefix, *window)
    prefix_ll = np.zeros((len(docs), K))
    for batch, logp in score_rows(model, prefix, all_experts(model, len(prefix)), fetch,
                                  desc="prefix", **scoring):
        np.add.at(prefix_ll, where[[prefix[r][0] for r in batch]],
                  logp.sum(-1).double().cpu().numpy())  # (B, K)
    chosen, log_weights = choose_experts(log_prior, prefix_ll, routing.top_k)

    rest = rest_rows(lengths, docs, routing.prefix, *window)
    experts = torch.from_numpy(chosen[where[[d for d, *_ in rest]]]) if rest else torch.zeros(
        0, routing.top_k, dtype=torch.long)  # (rows, K')
    rest_ll = np.zeros((len(docs), routing.top_k))
    for batch, logp in score_rows(model, rest, experts, fetch, desc="routed", **scoring):
        np.add.at(rest_ll, where[[rest[r][0] for r in batch]],
                  logp.sum(-1).double().cpu().numpy())  # (B, K')
    return RoutedScores(routing=routing, docs=docs, prefix_ll=prefix_ll, chosen=chosen,
                        log_weights=log_weights, rest_ll=rest_ll,
                        forwards=expert_forwards(prefix, K) + expert_forwards(rest,
                                                                              routing.top_k))


# ----------------------------------------------------------------------------- the figures


def routed_documents(*, docs: np.ndarray, domains: np.ndarray, tokens_after: np.ndarray,
                     mixture: np.ndarray, routed: np.ndarray, chosen: np.ndarray,
                     winner: np.ndarray) -> pd.DataFrame:
    """Per routed document: domain, tokens after the prefix, the full mixture's and the routed
    log-likelihood of them (nats), the chosen experts (best first), the full-document winner,
    whether the top-1 choice is the winner and whether the winner is among the chosen."""
    frame = pd.DataFrame({"domain": domains, "tokens": tokens_after, "mixture": mixture,
                          "routed": routed}, index=pd.Index(docs, name="doc"))
    for j in range(chosen.shape[1]):
        frame[f"choice_{j + 1}"] = chosen[:, j]
    frame["winner"] = winner
    frame["correct"] = chosen[:, 0] == winner
    frame["winner_in_chosen"] = (chosen == winner[:, None]).any(1)
    return frame


ROUTING_TABLE_NOTE = ("tokens, mixture, routed and gap: the tokens after the prefix of the routed "
                      "documents (mixture: the full mixture's perplexity on them; gap: routed - "
                      "full, nats/token); accuracy: the top-1 choice is the full-document winner")


def routing_table(frame: pd.DataFrame, domains: Sequence[str]) -> pd.DataFrame:
    """Overall and per domain: routed documents, tokens after the prefix, the full mixture's and
    the routed perplexity on them, the gap (routed - full, nats/token), routing accuracy and how
    often the winner is among the chosen. Every figure is over the tokens after the prefix."""
    parts = {"overall": frame, **{d: frame[frame["domain"] == d] for d in domains
                                  if (frame["domain"] == d).any()}}
    rows = {}
    for name, part in parts.items():
        tokens = part["tokens"].sum()
        full, routed = (-part["mixture"].sum() / tokens, -part["routed"].sum() / tokens) if (
            tokens) else (np.nan, np.nan)
        rows[name] = {"documents": len(part), "tokens": int(tokens), "mixture": np.exp(full),
                      "routed": np.exp(routed), "gap": routed - full,
                      "accuracy": part["correct"].mean() if len(part) else np.nan,
                      "winner_in_chosen": part["winner_in_chosen"].mean() if len(part)
                      else np.nan}
    table = pd.DataFrame(rows).T.astype({"documents": int, "tokens": int})
    table.index.name = "subset"
    table.attrs["notes"] = [ROUTING_TABLE_NOTE]
    return table


CURVE_COST_NOTE = ("forwards_per_doc_token_full and _routed: expert forwards each pass runs per "
                   "token of the routed documents, prefix included (every token a pass reads: "
                   "full scoring costs K per token)")


def routing_curve(model: MixtureLM, dataset: BinarizedDataset, *,
                  prefixes: Sequence[int] = (16, 32, 64, 128), top_k: Sequence[int] = (1,),
                  prior: str = "start", prior_dataset: BinarizedDataset | None = None,
                  tokens_per_sample: int | None = None, context_window: int = 0,
                  max_sentences: int = 8, progress: bool = True) -> pd.DataFrame:
    """Routed against full perplexity, routing accuracy and cost at every (M, K'), from one pass
    of every expert over every token (their cumulative sums give every prefix at once): the
    numbers `eval-lm --routing prefix:M,topk:K'` reports overall, one row each. The perplexities
    are over the tokens after the prefix, the cost columns (forwards_per_doc_token_full,
    forwards_per_doc_token_routed) over every token of the routed documents: the table's note
    says so."""
    T, C = resolve_window(model, tokens_per_sample, context_window)
    K = model.num_experts
    routings = [Routing(prefix=int(m), top_k=int(k)) for m in prefixes for k in top_k]
    for routing in routings:
        routing.check(K)
    lengths = np.diff(np.asarray(dataset.offsets, dtype=np.int64))
    window = dict(tokens_per_sample=T, context_window=C, max_sentences=max_sentences)
    cached = resolve_log_prior(model, prior, prior_dataset, latent="document", **window,
                               progress=progress)
    log_prior = model.start_log_prior().numpy() if cached is None else cached
    tokens = window_token_log_probs(model, lengths, lambda d, s, e: dataset.chunk_tokens(
        Chunk(d, s, e)), pad_id=dataset.pad_id, progress=progress, **window)
    sums = np.concatenate([np.zeros((1, K)), np.cumsum(tokens, axis=0, dtype=np.float64)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    doc_ll = sums[offsets[1:]] - sums[offsets[:-1]]  # (D, K)
    winner = (doc_ll + log_prior[None, :]).argmax(1)
    names = np.asarray(dataset.domains)[np.asarray(dataset.domain_ids, dtype=np.int64)]
    out = []
    for routing in routings:
        docs = routed_docs(lengths, routing)
        prefix_ll = sums[offsets[docs] + routing.prefix] - sums[offsets[docs]]  # (R, K)
        chosen, log_weights = choose_experts(log_prior, prefix_ll, routing.top_k)
        rest = np.take_along_axis(doc_ll[docs] - prefix_ll, chosen, axis=1)  # (R, K')
        frame = routed_documents(
            docs=docs, domains=names[docs], tokens_after=lengths[docs] - routing.prefix,
            mixture=full_after_prefix(log_prior, prefix_ll, doc_ll[docs]),
            routed=routed_log_likelihood(log_weights, rest), chosen=chosen, winner=winner[docs])
        full, routed, scored = forwards(lengths, routing, K, T, C)
        overall = routing_table(frame, dataset.domains).loc["overall"]
        out.append({"prefix": routing.prefix, "top_k": routing.top_k, **overall.to_dict(),
                    "short_documents": len(lengths) - len(docs),
                    "forwards_per_doc_token_full": full / max(scored, 1),
                    "forwards_per_doc_token_routed": routed / max(scored, 1)})
    curve = pd.DataFrame(out).astype({"documents": int, "tokens": int})
    curve.attrs.update(prior=prior, num_experts=K, tokens_per_sample=T, context_window=C)
    curve.attrs["notes"] = [ROUTING_TABLE_NOTE, CURVE_COST_NOTE]
    return curve


__all__ = ["RoutedScores", "Routing", "choose_experts", "forwards", "full_after_prefix",
           "parse_routing", "routed_documents", "routed_log_likelihood", "routed_scores",
           "routing_curve", "routing_table"]
