"""Perplexity per method, responsibilities and cluster agreement: `moelab eval-lm` and `evaluate`.

Every document is scored by every expert with sliding windows, as fairseq-eval-lm does
(docs/design.md section 3): windows of T = tokens-per-sample tokens with `<expert_z>` at
position 0; the first window scores its T tokens, each later one scores T - C new tokens after C
tokens of context (C = context-window). All K experts of a batch of windows run as one forward
of B*K rows.

From the per-document log-likelihoods log p(doc | z) follow:
- `mixture`: log p(doc) = logsumexp_z [log pi_z + log p(doc | z)], pi the prior at the document
  start (empty context). The honest number.
- `oracle`: max_z log p(doc | z), the best single expert per document. A bound, not a density.
- `expert_k`: each expert alone.

Beyond that default (document latent, prior at the start, every expert on every token), each
labelled in the result's summary and printed report: `prior="cached"` and `latent="chunk"`
(moelab.eval.latents), and routed inference, `routing="prefix:M,topk:K'"` (moelab.eval.routing).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moelab.clustering import (
    CONFIDENCE_KEYS,
    agreement,
    document_posterior,
    experts_in_use,
    flat_posterior,
    posterior_confidence,
)
from moelab.data import BinarizedDataset, Chunk
from moelab.eval.latents import (
    CACHED_FROM,
    LATENTS,
    PRIORS,
    check_choice,
    chunk_scores,
    resolve_log_prior,
)
from moelab.eval.routing import (
    Routing,
    forwards,
    full_after_prefix,
    parse_routing,
    routed_documents,
    routed_scores,
    routing_table,
)
from moelab.eval.windows import resolve_window, window_log_likelihoods, window_token_log_probs
from moelab.model import MixtureLM

ORACLE_NOTE = ("oracle = the best single expert for each document, chosen by that document's own "
               "likelihood: a lower bound on perplexity, not a density")

# ----------------------------------------------------------------------------- configuration


@dataclass
class EvalConfig:
    tokens_per_sample: int | None = None  # window length T; None: the model's max_seq_len
    context_window: int = 0  # C tokens of context before the T - C new tokens of later windows
    max_sentences: int = 8  # windows per batch (each becomes K rows)
    gen_subset: str = "test"  # split to evaluate
    routing: str = "full"  # full | prefix:M | topk:K' | prefix:M,topk:K' (moelab.eval.routing)
    prior: str = "start"  # start: the model's own prior | cached: mean posterior on valid
    latent: str = "document"  # document: one z per document | chunk: one z per chunk

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
        check_choice("prior", self.prior, PRIORS)
        check_choice("latent", self.latent, LATENTS)
        check_options(parse_routing(self.routing), self.latent)


def check_options(routing: Routing | None, latent: str) -> None:
    if routing is not None and latent != "document":
        raise ValueError(f"--routing {routing} chooses experts for a whole document, but "
                         f"--latent {latent} gives every chunk its own expert: use --latent "
                         "document with --routing, or --routing full")


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
    # documents, tokens, usage entropy, experts used, window settings, and which prior
    # (start | cached, prior_from: where it was read), latent and routing made the numbers
    summary: pd.Series
    log_prior: np.ndarray  # (K,) log pi_z at the document start, or the cached prior
    notes: list[str] = field(default_factory=list)
    # with routing (moelab.eval.routing): overall and per domain, routed documents, tokens after the
    # prefix, full mixture and routed perplexity on them, gap, accuracy, winner_in_chosen; the
    # summary's cost beside it is per token read: forwards_per_token_* over every token of the
    # routed documents, prefix included, tokens_per_second_full over every token of the split
    # (the full pass reads them all), tokens_per_second_routed over the routed documents' tokens
    routing: pd.DataFrame | None = None
    routed_documents: pd.DataFrame | None = None  # the same, per routed document

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
            **({} if self.routing is None else {"routing": table(self.routing)}),
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
    routing: str | Routing | None = "full",
    prior: str = "start",
    latent: str = "document",
    prior_dataset: BinarizedDataset | None = None,
) -> EvalResult:
    """Score every document of `dataset` with every expert and summarize (docs/design.md section 3).

    tokens_per_sample defaults to the model's context length (max_seq_len). `prior` and
    `latent` are moelab.eval.latents' (`prior="cached"` estimates the prior on `prior_dataset`, the
    valid split); `routing` is moelab.eval.routing's, whose figures go to `.routing` and
    `.routed_documents` beside the full evaluation, which is always made.
    """
    T, C = resolve_window(model, tokens_per_sample, context_window)
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    routing = parse_routing(routing)
    check_choice("prior", prior, PRIORS)
    check_choice("latent", latent, LATENTS)
    check_options(routing, latent)
    if routing is not None:
        routing.check(model.num_experts)
    D = len(dataset)
    if D == 0:
        raise ValueError(f"the {dataset.split} split has no documents to evaluate")
    window = dict(tokens_per_sample=T, context_window=C, max_sentences=max_sentences)
    cached = resolve_log_prior(model, prior, prior_dataset, latent=latent, **window,
                               progress=progress)
    log_pi = model.start_log_prior().numpy() if cached is None else cached  # (K,)
    lengths = np.diff(np.asarray(dataset.offsets, dtype=np.int64))
    fetch = lambda d, s, e: dataset.chunk_tokens(Chunk(d, s, e))  # noqa: E731
    scoring = dict(**window, pad_id=dataset.pad_id, progress=progress)

    started = time.perf_counter()
    if routing is None and latent == "document":
        ll, sums = window_log_likelihoods(model, D, lengths, fetch, **scoring).numpy(), None
    else:  # per-token scores: prefixes and chunks are sums of them
        token_lp = window_token_log_probs(model, lengths, fetch, **scoring)  # (N, K)
        sums = np.concatenate([np.zeros((1, model.num_experts)),
                               np.cumsum(token_lp, axis=0, dtype=np.float64)])  # (N + 1, K)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ll = sums[offsets[1:]] - sums[offsets[:-1]]  # (D, K)
    seconds = time.perf_counter() - started
    mixture = log_posterior = None
    if latent == "chunk":
        chunks = chunk_scores(model, dataset, token_lp, tokens_per_sample=T, log_prior=cached)
        mixture = chunks.document_mixture(D)
        with np.errstate(divide="ignore"):
            log_posterior = np.log(chunks.document_posterior(D))
    settings = {"prior": prior, "latent": latent,
                "prior_from": prior_source(prior, latent, prior_dataset),
                "routing": "full" if routing is None else str(routing),
                "seconds_full": seconds}
    result = summarize(ll, log_pi, lengths, np.asarray(dataset.domain_ids, dtype=np.int64),
                       list(dataset.domains), tokens_per_sample=T, context_window=C,
                       mixture=mixture, log_posterior=log_posterior, settings=settings)
    result.notes += prior_notes(prior, prior_dataset, dataset)
    if routing is None:
        return result

    started = time.perf_counter()
    routed = routed_scores(model, lengths, fetch, log_pi, routing, **scoring)
    seconds = time.perf_counter() - started
    docs, M = routed.docs, routing.prefix
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    full_prefix = sums[offsets[docs] + M] - sums[offsets[docs]]  # (R, K) the full pass's
    frame = routed_documents(
        docs=docs, domains=result.documents["domain"].to_numpy()[docs],
        tokens_after=lengths[docs] - M, mixture=full_after_prefix(log_pi, full_prefix, ll[docs]),
        routed=routed.routed_ll, chosen=routed.chosen,
        winner=result.documents["winner"].to_numpy()[docs])
    full, _, scored = forwards(lengths, routing, model.num_experts, T, C)
    return with_routing(result, frame, {
        "short_documents": D - len(docs), "prefix_tokens": M, "top_k": routing.top_k,
        "forwards_per_token_full": full / max(scored, 1),
        "forwards_per_token_routed": routed.forwards / max(scored, 1),
        "seconds_routed": seconds,
        "tokens_per_second_full": int(lengths.sum()) / max(result.summary["seconds_full"], 1e-9),
        "tokens_per_second_routed": scored / max(seconds, 1e-9)},
        domains=list(dataset.domains),
        flat_prior=M == 0 and np.ptp(log_pi) == 0 and routing.top_k < model.num_experts)


def prior_source(prior: str, latent: str, prior_dataset: BinarizedDataset | None) -> str:
    """Where the prior was read, in words, for the summary."""
    if prior == "cached":
        split = prior_dataset.split if prior_dataset is not None else CACHED_FROM
        return f"mean {'chunk' if latent == 'chunk' else 'document'} posterior on {split}"
    return "each chunk's context" if latent == "chunk" else "the document start"


def prior_notes(prior: str, prior_dataset: BinarizedDataset | None,
                dataset: BinarizedDataset) -> list[str]:
    same = prior == "cached" and prior_dataset is not None and (
        prior_dataset.split == dataset.split and prior_dataset.data_dir == dataset.data_dir)
    return [f"the cached prior was estimated on the split it weighs ({dataset.split}): it has "
            "seen the documents it scores, an optimistic number"] if same else []


def with_routing(result: EvalResult, frame: pd.DataFrame, numbers: dict, *,
                 domains: list[str], flat_prior: bool = False) -> EvalResult:
    """`result` with the routed figures of `frame` (moelab.eval.routing.routed_documents) and the
    cost `numbers` added to its tables and summary."""
    result.routed_documents = frame
    result.routing = routing_table(frame, domains)
    overall = result.routing.loc["overall"]
    result.summary = pd.concat([result.summary, pd.Series({
        **numbers, "routed_documents": int(overall["documents"]),
        "routed_tokens": int(overall["tokens"]),
        "mixture_after_prefix_perplexity": float(overall["mixture"]),
        "routed_perplexity": float(overall["routed"]),
        "routing_accuracy": float(overall["accuracy"]),
        "winner_in_chosen": float(overall["winner_in_chosen"])})])
    if numbers["short_documents"]:
        result.notes.append(
            f"{numbers['short_documents']} document(s) of {numbers['prefix_tokens']} tokens or "
            "fewer have nothing after the prefix: they are left out of the routed figures")
    if flat_prior:
        result.notes.append("routing without a prefix ranks the experts by the prior alone, "
                            "and this prior is uniform: every expert ties and the first K' "
                            "are taken")
    return result


def summarize(ll: np.ndarray, log_pi: np.ndarray, tokens: np.ndarray, domain_ids: np.ndarray,
              domains: list[str], *, tokens_per_sample: int, context_window: int,
              mixture: np.ndarray | None = None, log_posterior: np.ndarray | None = None,
              settings: dict | None = None) -> EvalResult:
    """Per-document log p(doc | z) (D, K) -> every table of EvalResult.

    By default the mixture is the document latent's, logsumexp_z [log pi_z + log p(doc | z)];
    another latent passes its own per-document `mixture` (D,) and `log_posterior` (D, K).
    `settings` (prior, latent, routing, ...) go into the summary.
    """
    D, K = ll.shape
    experts = [f"expert_{k}" for k in range(K)]
    if mixture is None:
        mixture, log_posterior = document_posterior(ll, log_pi)  # (D,), (D, K)
    posterior = np.exp(log_posterior)  # (D, K)
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
        clusters = pd.Series({**agreement(domain_ids, winner),
                              **posterior_confidence(ll, log_posterior, tokens)},
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
        "experts_used": int(experts_in_use(share).sum()),
        "precision": "float32",  # moelab.eval.windows scores in float32 on every device
        "prior": "start", "latent": "document", "routing": "full", **(settings or {}),
    })
    return EvalResult(perplexity=perplexity, documents=documents, posteriors=posteriors,
                      responsibilities=responsibilities, clusters=clusters, usage=usage,
                      summary=summary, log_prior=log_pi, notes=notes)


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
        describe_mixture(result),
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
        ("cached prior: " if s.get("prior") == "cached" else "prior at document start: ")
        + "  ".join(f"{math.exp(x):.3f}" for x in result.log_prior),
    ]
    if result.routing is not None:
        lines += ["", describe_routing(result)]
    lines += [f"note: {n}" for n in result.notes if n != doubt]
    return "\n".join(lines).strip("\n")


def describe_mixture(result: EvalResult) -> str:
    """Which latent and prior made the mixture column, as eval-lm prints it."""
    s = result.summary
    latent = s.get("latent", "document")
    what = ("one expert per document" if latent == "document"
            else "every chunk its own mixture")
    return (f"mixture: --latent {latent} ({what}), --prior {s.get('prior', 'start')} (read "
            f"from {s.get('prior_from', 'the document start')}), --routing "
            f"{s.get('routing', 'full')}")


def describe_routing(result: EvalResult) -> str:
    """The routed figures beside the full mixture's on the same tokens, and what each cost."""
    s, table = result.summary, result.routing
    shown = table.rename(columns={"tokens": "tokens after prefix", "mixture": "full ppl",
                                  "routed": "routed ppl", "gap": "gap (nats/token)"})
    lines = [
        f"routed inference (--routing {s['routing']}): the top {int(s['top_k'])} expert(s) by "
        f"the posterior after the first {int(s['prefix_tokens'])} tokens score the rest; "
        f"perplexity on the tokens after the prefix ({int(s['routed_documents'])} documents, "
        f"{int(s['short_documents'])} no longer than the prefix left out)",
        shown.to_string(formatters={"gap (nats/token)": "{:+.4f}".format},
                        float_format=lambda x: f"{x:.3f}"),
        f"routing accuracy {s['routing_accuracy']:.3f} (top-1 choice = the full-document "
        f"winner); winner among the chosen {s['winner_in_chosen']:.3f}",
        f"cost, per token read (every token of the routed documents, prefix included, not "
        f"only the tokens after it): {s['forwards_per_token_full']:.2f} expert forwards per "
        f"token in full, {s['forwards_per_token_routed']:.2f} routed; "
        f"{s['tokens_per_second_full']:.0f} tokens/s in full (every token of the split), "
        f"{s['tokens_per_second_routed']:.0f} routed (every token of the routed documents)",
    ]
    return "\n".join(lines)


# the summary's entries that say how the numbers were made (a cached result keeps them)
SETTINGS_KEYS = ("prior", "latent", "prior_from", "routing", "seconds_full")
RESULT_FILES = ("perplexity", "documents", "posteriors", "responsibilities", "usage")
ROUTING_FILES = ("routing", "routed_documents")  # with --routing only


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
    for name in ROUTING_FILES if result.routing is not None else ():
        path = folder / f"{split}_{name}.csv"
        getattr(result, name).to_csv(path)
        written.append(path)
    path = folder / f"{split}_eval.json"
    payload = {"split": split, "settings": settings or {}, **result.to_json()}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    written.append(path)
    return written
