"""Warm start (--init-clusters tfidf): balanced tf-idf clusters choose the experts of the first
--init-updates updates, then the E-step decides; the clusters are cached for an exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from moelab.data import BinarizedDataset
from moelab.errors import MoelabError
from moelab.train import read_history, scoring, train, update, warm_start
from moelab.train import trainer as trainer_module
from moelab.train.config import RunConfig

TINY = dict(arch="tiny", decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
            decoder_attention_heads=4, tokens_per_sample=64, max_tokens=512, device="cpu",
            progress_bar=False, lr=3e-3, warmup_updates=2)


def _planted(sizes: list[int], *, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """L2-normalized sparse rows: group g draws its terms from its own 20 terms."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    terms = 20 * len(sizes)
    for g, size in enumerate(sizes):
        for _ in range(size):
            row = np.zeros(terms)
            row[rng.choice(np.arange(20 * g, 20 * g + 20), 8, replace=False)] = rng.random(8) + .5
            row[rng.integers(terms)] += 0.3  # a stray shared term
            rows.append(row / np.linalg.norm(row))
            labels.append(g)
    return sp.csr_matrix(np.array(rows)), np.array(labels)


def test_balanced_kmeans_recovers_planted_clusters_in_equal_sizes():
    vectors, labels = _planted([34, 33, 33])
    clusters = warm_start.balanced_kmeans(vectors, 3, seed=1)
    assert adjusted_rand_score(labels, clusters) == 1.0
    assert sorted(np.bincount(clusters, minlength=3)) == [33, 33, 34]


def test_balanced_kmeans_keeps_sizes_equal_when_the_planted_groups_are_not():
    vectors, _ = _planted([60, 25, 16])
    for k in (2, 3, 4):
        sizes = np.bincount(warm_start.balanced_kmeans(vectors, k, seed=2), minlength=k)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 101


def test_balanced_kmeans_is_deterministic_by_seed():
    vectors, _ = _planted([20, 20, 20, 20], seed=3)
    first = warm_start.balanced_kmeans(vectors, 4, seed=5)
    assert np.array_equal(first, warm_start.balanced_kmeans(vectors, 4, seed=5))


def test_balanced_kmeans_seeds_give_their_own_clusters():
    """Rows without planted groups, where the seeding decides the clusters: seeds 1, 2 and 3
    give three different partitions, so training seeds do not share one warm start."""
    rng = np.random.default_rng(0)
    rows = rng.random((60, 30)) * (rng.random((60, 30)) < 0.3)
    vectors = sp.csr_matrix(rows / np.linalg.norm(rows, axis=1, keepdims=True))
    clusters = [warm_start.balanced_kmeans(vectors, 4, seed=s) for s in (1, 2, 3)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert adjusted_rand_score(clusters[a], clusters[b]) < 0.9


def test_the_documents_are_clustered_with_the_runs_seed(tiny_bin):
    ds = BinarizedDataset(tiny_bin, "train")
    vectors = warm_start.tfidf_vectors(ds)
    by_seed = {s: warm_start.cluster_documents(ds, 3, seed=s) for s in (1, 2, 3)}
    for seed, clusters in by_seed.items():
        assert np.array_equal(clusters, warm_start.balanced_kmeans(vectors, 3, seed=seed))
    assert len({tuple(c) for c in by_seed.values()}) > 1  # the check above can tell seeds apart


def test_tfidf_clusters_of_the_tiny_corpus_are_its_domains(tiny_bin):
    ds = BinarizedDataset(tiny_bin, "train")
    clusters = warm_start.cluster_documents(ds, 3, seed=1)
    assert normalized_mutual_info_score(ds.domain_ids, clusters) > 0.8
    sizes = np.bincount(clusters, minlength=3)
    assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("options, message", [
    (dict(init_updates=3), "needs --init-clusters tfidf"),
    (dict(init_clusters="tfidf"), "needs --init-updates N > 0"),
    (dict(init_clusters="tfidf", init_updates=3, method="dense"), "needs K > 1"),
    (dict(init_clusters="tfidf", init_updates=3, num_experts=1), "needs K > 1"),
    (dict(init_clusters="tfidf", init_updates=11), "larger than --max-update 10"),
    (dict(init_clusters="tfidf", init_updates=-1), "must be >= 0"),
    (dict(init_clusters="kmeans", init_updates=3), "must be one of none, tfidf"),
])
def test_warm_start_options_that_mean_nothing_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_kwargs("data-bin", max_update=10, **options)


def test_too_few_train_documents_for_k_clusters_is_refused(tiny_bin, tmp_path):
    with pytest.raises(MoelabError, match="at least K = 500 train documents"):
        train(tiny_bin, method="hMoEup", num_experts=500, init_clusters="tfidf",
              init_updates=1, max_update=1, save_dir=tmp_path, **TINY)


def _spy_em_steps(monkeypatch) -> list[dict]:
    """Every EM step's documents, assignment, responsibilities and (hard EM) trained experts."""
    calls: list[dict] = []
    real_step, real_m_step = update.em_step, scoring.BatchScores.m_step

    def em_step(scorer, batch, method, **kwargs):
        calls.append({"doc_ids": batch.doc_ids.clone(), "assignment": kwargs.get("experts")})
        out = real_step(scorer, batch, method, **kwargs)
        calls[-1]["r"] = out.responsibilities.clone()
        return out

    def m_step(self, experts=None):
        calls[-1]["trained"] = None if experts is None else experts.clone()
        return real_m_step(self, experts)

    monkeypatch.setattr(update, "em_step", em_step)
    monkeypatch.setattr(scoring.BatchScores, "m_step", m_step)
    return calls


@pytest.mark.parametrize("method", ["hMoEup", "sMoElp"])
def test_the_first_updates_train_the_clustered_expert_then_the_estep_decides(
        tiny_bin, tmp_path, monkeypatch, method):
    calls = _spy_em_steps(monkeypatch)
    train(tiny_bin, method=method, num_experts=3, init_clusters="tfidf", init_updates=3,
          max_update=6, log_interval=1, save_dir=tmp_path, **TINY)
    clusters = torch.from_numpy(np.load(tmp_path / warm_start.CACHE_FILE)["clusters"])
    assert len(calls) == 6  # one EM step per update (update_freq 1)
    for call in calls[:3]:
        expected = clusters[call["doc_ids"]]
        assert torch.equal(call["assignment"], expected)
        assert torch.equal(call["r"], torch.nn.functional.one_hot(expected, 3).float())
        if method.startswith("h"):
            assert torch.equal(call["trained"], expected)
    for call in calls[3:]:
        assert call["assignment"] is None
        assert ((call["r"] > 0) & (call["r"] < 1)).any()  # a posterior, not a one-hot
        if method.startswith("h"):
            assert torch.equal(call["trained"], call["r"].argmax(-1))
    # no remedy: the log's posterior is the model's own, and it is not written twice
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
             if '"kind": "train"' in line]
    assert len(lines) == 6 and not any("model_posterior_mass" in line for line in lines)


def test_defaults_cluster_nothing_and_let_the_estep_decide(tiny_bin, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("clustered although --init-clusters is none")

    monkeypatch.setattr(warm_start, "cluster_documents", refuse)
    calls = _spy_em_steps(monkeypatch)
    train(tiny_bin, method="hMoEup", num_experts=3, max_update=3, save_dir=tmp_path, **TINY)
    assert not (tmp_path / warm_start.CACHE_FILE).exists()
    assert [c["assignment"] for c in calls] == [None] * 3
    assert all(((c["r"] > 0) & (c["r"] < 1)).any() for c in calls)


class _Stop(Exception):
    pass


def _train_losses(save_dir):
    rows = read_history(save_dir).query("kind == 'train'")
    return list(zip(rows["update"], rows.loss, rows.nll, rows.grad_norm, strict=True))


def test_resume_reuses_the_cached_clusters_and_continues_exactly(tiny_bin, tmp_path,
                                                                 monkeypatch):
    """Stopped inside the warm start, a resume reads the save dir's clusters (clustering again
    is refused here) and ends bit-identical to a run never stopped."""
    options = dict(TINY, method="hMoElp", num_experts=3, dropout=0.1, init_clusters="tfidf",
                   init_updates=4, max_update=6, log_interval=1, save_interval_updates=2,
                   seed=3)
    full = train(tiny_bin, save_dir=tmp_path / "full", **options)

    real_step, steps = trainer_module.train_step, []

    def stop_at_the_third_update(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise _Stop  # after checkpoint_last of update 2
        return real_step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "train_step", stop_at_the_third_update)
        with pytest.raises(_Stop):
            train(tiny_bin, save_dir=tmp_path / "split", **options)
    cached = (tmp_path / "split" / warm_start.CACHE_FILE).read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("clustered again on resume")

    monkeypatch.setattr(warm_start, "cluster_documents", refuse)
    resumed = train(tiny_bin, save_dir=tmp_path / "split", **options)
    assert (tmp_path / "split" / warm_start.CACHE_FILE).read_bytes() == cached
    assert _train_losses(tmp_path / "full") == _train_losses(tmp_path / "split")
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_a_cache_made_for_another_k_is_not_reused(tiny_bin, tmp_path):
    ds = BinarizedDataset(tiny_bin, "train")
    say = [].append
    two = warm_start.load_or_cluster(ds, tmp_path, 2, seed=1, write=True, say=say)
    three = warm_start.load_or_cluster(ds, tmp_path, 3, seed=1, write=True, say=say)
    assert two.max() == 1 and three.max() == 2
    again = warm_start.load_or_cluster(ds, tmp_path, 3, seed=1, write=True, say=say)
    assert np.array_equal(again, three)


def test_a_cache_made_with_another_seed_is_not_reused(tiny_bin, tmp_path, monkeypatch):
    """A run with seed 2 clusters its own documents, not seed 1's cached clusters; the cache it
    writes then serves seed 2."""
    ds = BinarizedDataset(tiny_bin, "train")
    notes = []
    warm_start.load_or_cluster(ds, tmp_path, 3, seed=1, write=True, say=notes.append)
    real, seeds = warm_start.cluster_documents, []

    def spy(ds, k, *, seed):
        seeds.append(seed)
        return real(ds, k, seed=seed)

    monkeypatch.setattr(warm_start, "cluster_documents", spy)
    second = warm_start.load_or_cluster(ds, tmp_path, 3, seed=2, write=True, say=notes.append)
    assert seeds == [2] and "K or seed" in notes[-1]
    assert np.array_equal(second, real(ds, 3, seed=2))
    again = warm_start.load_or_cluster(ds, tmp_path, 3, seed=2, write=True, say=notes.append)
    assert seeds == [2] and np.array_equal(again, second)

