"""moelab.attribution: a tf-idf domain classifier labels each expert's samples with a domain."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import DOMAINS

from moelab.attribution import (
    DomainClassifier,
    attribute_samples,
    attribution_score,
    fit_domain_classifier,
    owned_domains,
    training_documents,
)


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


def test_the_classifier_recovers_the_domains_of_held_out_documents(classifier, held_out):
    texts, domains = held_out
    assert set(domains) == set(DOMAINS) and len(texts) >= 15
    assert classifier.predict(texts) == domains


def test_the_classifier_is_fit_on_decoded_text(tiny_bin):
    texts, domains = training_documents(tiny_bin, max_per_domain=2)
    assert sorted(domains) == sorted(DOMAINS * 2)  # the first 2 of each domain
    assert all(" of " in t or " the " in t for t in texts)  # words, not token ids


def test_the_classifier_gives_the_same_labels_every_fit(tiny_bin, held_out, classifier):
    again = fit_domain_classifier(tiny_bin)
    probe = [t[:60] for t in held_out[0]]  # short texts, where a tie could go either way
    assert again.predict(probe) == classifier.predict(probe)


def test_owned_domain_is_the_experts_highest_responsibility():
    owned = owned_domains(responsibilities({0: "gamma", 1: "alpha", 2: "beta"}))
    assert owned.to_dict() == {"expert_0": "gamma", "expert_1": "alpha", "expert_2": "beta"}


def test_attribution_is_one_when_each_expert_writes_its_own_domain(classifier, held_out):
    texts, domains = held_out
    by_domain = {d: [t[:300] for t, dd in zip(texts, domains, strict=True) if dd == d][:3]
                 for d in DOMAINS}
    owner = {0: "beta", 1: "gamma", 2: "alpha"}
    samples = {k: by_domain[d] for k, d in owner.items()}
    table = attribute_samples(classifier, samples, responsibilities(owner))
    assert table["samples read as"].to_dict() == {f"expert_{k}": d for k, d in owner.items()}
    assert table["match"].all() and (table["share"] == 1.0).all()
    assert attribution_score(table) == 1.0


def test_attribution_is_zero_when_the_samples_are_swapped(classifier, held_out):
    texts, domains = held_out
    by_domain = {d: [t[:300] for t, dd in zip(texts, domains, strict=True) if dd == d][:3]
                 for d in DOMAINS}
    owner = {0: "beta", 1: "gamma", 2: "alpha"}
    swapped = {0: by_domain["gamma"], 1: by_domain["alpha"], 2: by_domain["beta"]}
    table = attribute_samples(classifier, swapped, responsibilities(owner))
    assert not table["match"].any()
    assert attribution_score(table) == 0.0


def test_an_expert_without_text_matches_nothing(classifier):
    table = attribute_samples(classifier, {0: ["", "  "]}, responsibilities({0: "alpha"}))
    assert table.loc["expert_0", "samples read as"] == "" and not table["match"].any()


def test_a_classifier_needs_two_domains():
    with pytest.raises(ValueError, match="at least 2 domains"):
        DomainClassifier.fit(["a b c", "d e f"], ["x", "x"])
