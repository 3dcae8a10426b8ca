"""The posterior over experts and what can be read from it, shared by validation during training
and by evaluation (docs/design.md section 3).

From each document's log-likelihood under every expert, log p(doc | z), and the prior at its
start, log pi_z: the posterior p(z | doc), its argmax as a clustering of the documents, the
clustering's agreement with the domain labels (purity, NMI, ARI), and how sure that clustering
is (the confidence figures, with the thresholds below which it must not be read as a split).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# When a clustering's confidence says the posterior is flat: its purity,
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


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log sum exp along `axis`; rows of -inf give -inf (a prior of 0 for an expert is allowed)."""
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def document_posterior(ll: np.ndarray, log_pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D, K) log p(doc | z) and (K,) log pi_z -> ((D,) the mixture log p(doc), (D, K) the log
    posterior log p(z | doc))."""
    joint = ll + log_pi[None, :]  # (D, K) log pi_z + log p(doc | z)
    mixture = logsumexp(joint)  # (D,)
    return mixture, joint - mixture[:, None]


def agreement(domain_ids: np.ndarray, winner: np.ndarray) -> dict[str, float]:
    """The clustering by argmax posterior (`winner`, (D,)) against the domain labels (D,)."""
    # sklearn takes 1.4 s to import: only where the metrics are computed
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"purity": purity(domain_ids, winner),
            "nmi": float(normalized_mutual_info_score(domain_ids, winner)),
            "ari": float(adjusted_rand_score(domain_ids, winner))}


def experts_in_use(share: np.ndarray) -> np.ndarray:
    """(K,) whether each expert is in use: it wins at least 1/(4K) of the documents (share: the
    fraction each wins), a quarter of an even split. The summary's `experts_used` counts them;
    moelab.eval.attribution gives no domain to the others."""
    share = np.asarray(share, dtype=float)
    return share >= 1 / (4 * len(share))


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


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of documents whose cluster's most common label is their own label."""
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(labels[clusters == c]).max()
    return float(total / len(labels))
