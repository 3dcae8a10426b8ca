"""moelab.eval.attribution: a tf-idf domain classifier labels each expert's samples with a
domain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import DOMAINS

from moelab.eval.attribution import (
    DomainClassifier,
    attribute_samples,
    attribution_score,
    fit_domain_classifier,
    owned_domains,
    training_documents,
)
from moelab.eval.lm import summarize


@pytest.fixture(scope="module")
def classifier(tiny_bin) -> DomainClassifier:
    return fit_domain_classifier(tiny_bin)


@pytest.fixture(scope="module")
def held_out(tiny_bin) -> tuple[list[str], list[str]]:
    """The test split's documents, which the classifier never saw."""
    return training_documents(tiny_bin, split="test")


def responsibilities(owner: dict[int, str]) -> pd.DataFrame:
    """A domains x experts table where expert k's responsibility peaks at owner[k]."""
    table = pd.DataFrame(0.1, index=pd.Index(list(DOMAINS), name="domain"),
                         columns=[f"expert_{k}" for k in owner])
    for k, domain in owner.items():
        table.loc[domain, f"expert_{k}"] = 0.8
    return table


def usage(*shares: float) -> pd.DataFrame:
    """moelab.eval.lm's per-expert table: the share of the documents each expert wins."""
    return pd.DataFrame({"share": shares},
                        index=pd.Index([f"expert_{k}" for k in range(len(shares))], name="expert"))


def even(k: int) -> pd.DataFrame:
    return usage(*[1 / k] * k)


@pytest.fixture(scope="module")
def by_domain(held_out) -> dict[str, list[str]]:
    """Three held-out documents of each domain, cut to sample length."""
    texts, domains = held_out
    return {d: [t[:300] for t, dd in zip(texts, domains, strict=True) if dd == d][:3]
            for d in DOMAINS}


def test_the_classifier_recovers_the_domains_of_held_out_documents(classifier, held_out):
    texts, domains = held_out
    assert set(domains) == set(DOMAINS) and len(texts) >= 15
    assert classifier.predict(texts) == domains


def test_the_classifier_is_fit_on_the_training_split_only(tiny_bin, classifier):
    """Its weights are those of a fit on the train documents, not the test ones (which attribution
    must not have seen) nor both."""
    def weights(c: DomainClassifier) -> np.ndarray:
        return c.model.coef_

    on_train = DomainClassifier.fit(*training_documents(tiny_bin, split="train"))
    on_test = DomainClassifier.fit(*training_documents(tiny_bin, split="test"))
    assert weights(on_test).shape != weights(on_train).shape or not np.allclose(
        weights(on_test), weights(on_train))  # the check below can tell them apart
    assert classifier.vectorizer.vocabulary_ == on_train.vectorizer.vocabulary_
    np.testing.assert_array_equal(weights(classifier), weights(on_train))


def test_the_classifier_is_fit_on_decoded_text(tiny_bin):
    texts, domains = training_documents(tiny_bin, max_per_domain=2)
    assert sorted(domains) == sorted(DOMAINS * 2)  # the first 2 of each domain
    assert all(" of " in t or " the " in t for t in texts)  # words, not token ids


def test_the_classifier_gives_the_same_labels_every_fit(tiny_bin, held_out, classifier):
    again = fit_domain_classifier(tiny_bin)
    probe = [t[:60] for t in held_out[0]]  # short texts, where a tie could go either way
    assert again.predict(probe) == classifier.predict(probe)


def test_owned_domain_is_the_experts_highest_responsibility():
    owned = owned_domains(responsibilities({0: "gamma", 1: "alpha", 2: "beta"}), even(3))
    assert owned.to_dict() == {"expert_0": "gamma", "expert_1": "alpha", "expert_2": "beta"}


def test_an_expert_in_use_wins_at_least_a_quarter_of_an_even_share():
    """K = 4: 1/(4K) = 1/16 of the documents owns a domain, less owns nothing."""
    owner = {0: "alpha", 1: "beta", 2: "gamma", 3: "beta"}
    owned = owned_domains(responsibilities(owner), usage(0.75, 1 / 16, 0.1874, 0.0001))
    assert owned.to_dict() == {"expert_0": "alpha", "expert_1": "beta", "expert_2": "gamma",
                               "expert_3": ""}


def test_the_experts_that_own_a_domain_are_the_experts_used():
    """One rule with eval-lm's `experts used`: of 20 documents, expert 1 wins one (1/20 <
    1/16), expert 2 none; so 2 experts are used and 2 own a domain."""
    winners = np.array([0] * 12 + [1] + [3] * 7)
    ll = np.full((20, 4), -50.0)
    ll[np.arange(20), winners] = -10.0
    result = summarize(ll, np.full(4, -np.log(4)), np.full(20, 8), np.arange(20) % 3,
                       list(DOMAINS), tokens_per_sample=8, context_window=0)
    owned = owned_domains(result.responsibilities, result.usage)
    assert result.summary["experts_used"] == 2 == (owned != "").sum()
    assert owned["expert_1"] == "" and owned["expert_2"] == ""


def test_a_collapsed_model_scores_only_its_expert_in_use(classifier, by_domain):
    """K = 4, one expert wins every document: the idle experts' responsibilities are all zero,
    so each used to own the first domain by a tie and match when its samples read as it (0.75
    here). They own nothing and count as not matching."""
    table = pd.DataFrame(0.0, index=pd.Index(list(DOMAINS), name="domain"),
                         columns=[f"expert_{k}" for k in range(4)])
    table["expert_0"] = 1.0
    alike = {k: by_domain["alpha"] for k in range(1, 4)}  # a collapsed model writes alike
    scored = attribute_samples(classifier, {0: by_domain["beta"], **alike}, table,
                               usage=usage(1.0, 0.0, 0.0, 0.0))
    assert scored["owned domain"].tolist() == ["alpha", "", "", ""]
    assert not scored["match"].any() and attribution_score(scored) == 0.0
    scored = attribute_samples(classifier, {0: by_domain["alpha"], **alike}, table,
                               usage=usage(1.0, 0.0, 0.0, 0.0))
    assert scored["match"].tolist() == [True, False, False, False]
    assert attribution_score(scored) == 0.25


def test_a_match_needs_more_than_half_of_the_samples(classifier, by_domain):
    """Three samples read as three domains are no match, though the owned domain ties for the
    most votes (it used to win the tie); two of three are; two of four are not."""
    a, b, g = (by_domain[d] for d in DOMAINS)
    owner = responsibilities({0: "alpha", 1: "alpha", 2: "alpha"})
    table = attribute_samples(classifier, {0: [a[0], b[0], g[0]], 1: [a[0], a[1], b[0]],
                                           2: [a[0], a[1], b[0], g[0]]}, owner, usage=even(3))
    assert table["match"].tolist() == [False, True, False]
    assert table["share"].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert attribution_score(table) == pytest.approx(1 / 3)


def test_an_empty_sample_counts_and_reads_as_no_domain(classifier, by_domain):
    table = attribute_samples(classifier, {0: [by_domain["alpha"][0], "", " "]},
                              responsibilities({0: "alpha"}), usage=even(1))
    row = table.loc["expert_0"]
    assert row["samples read as"] == "alpha" and row["samples"] == 3
    assert row["share"] == pytest.approx(1 / 3) and not row["match"]


def test_attribution_is_one_when_each_expert_writes_its_own_domain(classifier, by_domain):
    owner = {0: "beta", 1: "gamma", 2: "alpha"}
    samples = {k: by_domain[d] for k, d in owner.items()}
    table = attribute_samples(classifier, samples, responsibilities(owner), usage=even(3))
    assert table["samples read as"].to_dict() == {f"expert_{k}": d for k, d in owner.items()}
    assert table["match"].all() and (table["share"] == 1.0).all()
    assert attribution_score(table) == 1.0


def test_attribution_is_zero_when_the_samples_are_swapped(classifier, by_domain):
    owner = {0: "beta", 1: "gamma", 2: "alpha"}
    swapped = {0: by_domain["gamma"], 1: by_domain["alpha"], 2: by_domain["beta"]}
    table = attribute_samples(classifier, swapped, responsibilities(owner), usage=even(3))
    assert not table["match"].any()
    assert attribution_score(table) == 0.0


def test_an_expert_without_text_matches_nothing(classifier):
    table = attribute_samples(classifier, {0: ["", "  "]}, responsibilities({0: "alpha"}),
                              usage=even(1))
    assert table.loc["expert_0", "samples read as"] == "" and not table["match"].any()


def test_every_expert_is_in_the_score_sampled_or_not(classifier, by_domain):
    """The score is over all K experts: one left out of `samples` reads as nothing."""
    owner = {0: "alpha", 1: "beta", 2: "gamma"}
    table = attribute_samples(classifier, {0: by_domain["alpha"]}, responsibilities(owner),
                              usage=even(3))
    assert table.index.tolist() == ["expert_0", "expert_1", "expert_2"]
    assert table["match"].tolist() == [True, False, False]
    assert attribution_score(table) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="experts \\[5\\]"):
        attribute_samples(classifier, {5: ["text"]}, responsibilities(owner), usage=even(3))


def test_a_classifier_needs_two_domains():
    with pytest.raises(ValueError, match="at least 2 domains"):
        DomainClassifier.fit(["a b c", "d e f"], ["x", "x"])
