"""Samples you can attribute: which domain does each expert's text read as?

A tf-idf domain classifier is fit on the training split's documents only (decoded with the
data-bin's tokenizer); it labels each expert's samples with a domain. An expert in use *owns* the
domain where its mean responsibility on the valid split is highest (moelab.eval.lm's
responsibilities table); an expert is in use when it wins at least 1/(4K) of the split's
documents, the rule of eval-lm's "experts used" (moelab.clustering.experts_in_use), and an unused
expert owns nothing: a collapsed model's idle experts, whose responsibilities are all near zero,
do not own a domain by a tie. An expert *matches* when strictly more than half of its samples
read as the domain it owns (an empty sample reads as none), so it has learned that domain's text,
not only its documents' posteriors. The attribution score is the share of the K experts that
match; an expert that owns nothing counts as one that does not.

    classifier = fit_domain_classifier("data-bin/mix")
    table = attribute_samples(classifier, {0: [text, ...], 1: [...]}, result.responsibilities,
                              usage=result.usage)
    attribution_score(table)  # 1.0: every expert writes its own domain
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moelab.clustering import experts_in_use
from moelab.data import BinarizedDataset

# Documents per domain the classifier reads at most: enough for tf-idf to see each domain's
# vocabulary, few enough that fitting takes a second on a laptop CPU.
MAX_DOCUMENTS_PER_DOMAIN = 400


@dataclass
class DomainClassifier:
    """tf-idf over character 2-4-grams, then a logistic regression; deterministic (no
    random state is drawn: lbfgs on a fixed matrix gives the same weights every run)."""

    vectorizer: object  # sklearn TfidfVectorizer, fitted
    model: object  # sklearn LogisticRegression, fitted
    domains: list[str]

    @classmethod
    def fit(cls, texts: Sequence[str], domains: Sequence[str]) -> DomainClassifier:
        # sklearn takes a second to import: only where a classifier is made
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if len(set(domains)) < 2:
            raise ValueError("a domain classifier needs documents of at least 2 domains, got "
                             f"{sorted(set(domains))}")
        # character n-grams within word boundaries: short samples of an undertrained model still
        # carry a domain's spelling when few of its whole words come out right
        vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True,
                                     min_df=2, max_features=50_000, dtype=np.float64)
        features = vectorizer.fit_transform(texts)
        model = LogisticRegression(C=10.0, max_iter=1000)
        model.fit(features, list(domains))
        return cls(vectorizer=vectorizer, model=model, domains=[str(d) for d in model.classes_])

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most probable domain of each text."""
        if not texts:
            return []
        return [str(d) for d in self.model.predict(self.vectorizer.transform(texts))]


def training_documents(data_bin: str | Path, *, split: str = "train",
                       max_per_domain: int = MAX_DOCUMENTS_PER_DOMAIN
                       ) -> tuple[list[str], list[str]]:
    """(texts, domains) of a data-bin split, decoded with its tokenizer; the first
    `max_per_domain` documents of each domain (in data-bin order, so the same every run)."""
    dataset = BinarizedDataset(data_bin, split)
    tokenizer = dataset.tokenizer()
    texts, labels, taken = [], [], Counter()
    for i, domain_id in enumerate(np.asarray(dataset.domain_ids)):
        domain = dataset.domains[int(domain_id)]
        if taken[domain] < max_per_domain:
            taken[domain] += 1
            texts.append(tokenizer.decode(dataset.document(i).tolist()))
            labels.append(domain)
    return texts, labels


def fit_domain_classifier(data_bin: str | Path, *, split: str = "train",
                          max_per_domain: int = MAX_DOCUMENTS_PER_DOMAIN) -> DomainClassifier:
    """A DomainClassifier of the data-bin's domains, fit on its training documents."""
    dataset = BinarizedDataset(data_bin, split)
    if dataset.domains == ["unknown"]:
        raise ValueError(f"{data_bin} has no domain labels: samples cannot be attributed to a "
                         "domain (preprocess a corpus with one folder per domain, or a .jsonl "
                         "with a domain field)")
    return DomainClassifier.fit(*training_documents(data_bin, split=split,
                                                    max_per_domain=max_per_domain))


def owned_domains(responsibilities: pd.DataFrame, usage: pd.DataFrame) -> pd.Series:
    """expert -> the domain with its highest mean responsibility (domains x experts table), or
    "" for an expert not in use (usage: moelab.eval.lm's per-expert table, its `share` of the
    documents won, on the same split)."""
    owned = responsibilities.idxmax(axis=0).astype(str)
    used = pd.Series(experts_in_use(usage["share"].to_numpy()), index=usage.index)
    return owned.where(used.reindex(owned.index, fill_value=False), "").rename("owned domain")


def attribute_samples(classifier: DomainClassifier, samples: Mapping[int, Sequence[str]],
                      responsibilities: pd.DataFrame, *, usage: pd.DataFrame) -> pd.DataFrame:
    """One row per expert of `responsibilities`: the domain it owns ("" when unused), the domain
    its samples read as (the classifier's most frequent label, ties alphabetically), that label's
    share of all its samples, and whether it matches: the owned domain is strictly more than half
    of its samples. An expert without samples reads as "" and does not match.

    samples: expert index -> its sample texts; responsibilities and usage: moelab.eval.lm's
    domains x experts and per-expert tables (expert_k), of one split, usually valid.
    """
    owned = owned_domains(responsibilities, usage)
    unknown = sorted(set(samples) - {int(e.removeprefix("expert_")) for e in owned.index})
    if unknown:
        raise ValueError(f"samples of experts {unknown}, which the responsibilities table does "
                         f"not have (it has {', '.join(owned.index)})")
    rows = {}
    for name, own in owned.items():
        texts = samples.get(int(name.removeprefix("expert_")), [])
        # an empty sample reads as no domain: it counts among the samples, never as a vote
        votes = Counter(classifier.predict([t for t in texts if t.strip()]))
        if votes:
            most = max(votes.values())
            read_as = min(d for d, n in votes.items() if n == most)
        else:
            read_as, most = "", 0
        rows[name] = {"owned domain": own, "samples read as": read_as,
                      "share": most / len(texts) if texts else 0.0, "samples": len(texts),
                      "match": bool(own) and 2 * votes[own] > len(texts)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "expert"
    table.attrs["notes"] = [
        "owned domain: the domain with the expert's highest mean responsibility, none for an "
        "expert that wins under 1/(4K) of the documents (not among the experts used); samples "
        "read as: the domain a tf-idf classifier fit on the training documents gives most of "
        "the expert's samples (share: of all its samples, an empty one reading as none); match: "
        "strictly more than half of its samples read as the domain it owns."]
    return table


def attribution_score(table: pd.DataFrame) -> float:
    """The share of the table's experts (all K of attribute_samples) that match: an expert that
    owns nothing is one that does not (NaN without experts)."""
    return float(table["match"].mean()) if len(table) else float("nan")
