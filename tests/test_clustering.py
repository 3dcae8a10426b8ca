"""moelab.clustering: the posterior over experts and its agreement with the domains, which
validation and evaluation share, checked against sklearn and the formulas written out."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from moelab.clustering import agreement, document_posterior, purity


def test_agreement_is_purity_nmi_and_ari_of_an_imperfect_clustering():
    """On a clustering that is neither perfect nor random the three scores differ, so a swap
    between them (or a wrong formula) shows."""
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    winner = np.array([0, 0, 1, 1, 1, 1, 2, 0])
    scores = agreement(labels, winner)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels, winner))
    assert scores["ari"] == pytest.approx(adjusted_rand_score(labels, winner))
    # cluster 0 holds labels 0,0,2 (2 right), cluster 1 holds 0,1,1,1 (3), cluster 2 holds 2 (1)
    assert scores["purity"] == purity(labels, winner) == pytest.approx(6 / 8)
    assert len({round(v, 6) for v in scores.values()}) == 3


def test_the_document_posterior_weighs_each_expert_by_its_prior():
    ll = np.array([[-10.0, -12.0], [-30.0, -29.0]])  # (D=2, K=2) log p(doc | z)
    log_pi = np.log(np.array([0.25, 0.75]))
    mixture, log_posterior = document_posterior(ll, log_pi)
    joint = np.exp(ll) * np.exp(log_pi)
    assert np.allclose(mixture, np.log(joint.sum(1)))
    assert np.allclose(np.exp(log_posterior), joint / joint.sum(1, keepdims=True))
