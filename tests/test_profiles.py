"""moelab.eval.profiles: each expert's words (log-ratio to the mixture), documents and domains,
checked against explicit per-expert forward passes on a tiny model; the figure, the report
section and the Workbench call."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moelab import report
from moelab.data import BinarizedDataset, PreprocessConfig, preprocess
from moelab.eval.lm import evaluate
from moelab.eval.profiles import expert_profiles, token_log_probs
from moelab.eval.windows import window_log_likelihoods
from moelab.model import MixtureLM, ModelConfig

WORDS = {"alpha": ["ab", "cd", "ef", "ab,", "gh.", "12", "ijk"],
         "beta": ["mn", "op", "qr", "st!", "uv", "2024", "wx"]}
SPECIAL = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def short_bin(tiny_bin, tmp_path_factory) -> Path:
    """Short documents (one window of 64 holds each) of two domains, with newlines, digits and
    punctuation, encoded with the tiny data-bin's tokenizer."""
    root = tmp_path_factory.mktemp("short") / "corpus"
    rng = random.Random(3)
    for domain, words in WORDS.items():
        (root / domain).mkdir(parents=True)
        for i in range(8):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))
                     for _ in range(2)]
            # rare words: "zz" once, "yy" twice in the corpus (below any minimum count)
            lines[1] += " zz" * (domain == "alpha" and i == 0) + " yy" * (i == 1)
            (root / domain / f"d{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    dest = tmp_path_factory.mktemp("short-bin") / "bin"
    preprocess(PreprocessConfig(destdir=str(dest), testpref=str(root),
                                tokenizer=str(tiny_bin / "spm.model")))
    return dest


@pytest.fixture(scope="module")
def dataset(short_bin) -> BinarizedDataset:
    return BinarizedDataset(short_bin, "test")


@pytest.fixture(scope="module")
def model() -> MixtureLM:
    """K = 3, a learned prior with a non-uniform start and experts that differ."""
    torch.manual_seed(1)
    model = MixtureLM(ModelConfig(vocab_size=512, num_experts=3, n_layer=2, n_embd=32, n_head=4,
                                  ffn_dim=64, max_seq_len=64, dropout=0.0, pad_id=3, gating=True,
                                  gating_dim=16)).eval()
    with torch.no_grad():
        model.transformer.tok_emb.weight.mul_(4.0)
        model.gating.fc2.bias.copy_(torch.tensor([0.9, -0.6, 0.2]))
    return model


def brute_force(model: MixtureLM, dataset: BinarizedDataset):
    """(ratios {word: [ratio (K,) per occurrence]}, log p(doc | z) (D, K), log pi (K,)): one
    explicit forward of [<expert_z>] + document per expert and document, words by the rule."""
    tokenizer = dataset.tokenizer()
    V, K = model.config.vocab_size, model.num_experts
    with torch.no_grad():
        log_pi = model.log_prior(torch.zeros(1, 0, dtype=torch.long),
                                 torch.zeros(1, dtype=torch.long))[0].double().numpy()
    ratios, lls = defaultdict(list), []
    for d in range(len(dataset)):
        doc = dataset.document(d).tolist()
        assert len(doc) <= model.config.max_seq_len  # one window: no context is cut
        lp = np.zeros((K, len(doc)))
        with torch.no_grad():
            for z in range(K):
                logp = torch.log_softmax(model(torch.tensor([[V + z, *doc[:-1]]]))[0].double(),
                                         dim=-1)
                lp[z] = [float(logp[t, x]) for t, x in enumerate(doc)]
        lls.append(lp.sum(1))
        pieces = [tokenizer.sp.id_to_piece(x) for x in doc]
        words, current = [], None
        for t, (x, piece) in enumerate(zip(doc, pieces, strict=True)):
            if x in SPECIAL:  # the end of the document: no word, and it ends the one before
                words, current = words + ([current] if current else []), None
                continue
            if current is None or piece.startswith("\u2581") or piece == "\n" \
                    or pieces[t - 1] == "\n":
                words, current = words + ([current] if current else []), [t]
            else:
                current.append(t)
        words += [current] if current else []
        for positions in words:
            text = tokenizer.decode([doc[t] for t in positions]).strip()
            if text:
                log_word = lp[:, positions].sum(1)  # (K,) log p_z(word | context)
                joint = log_pi + log_word
                log_mix = joint.max() + math.log(np.exp(joint - joint.max()).sum())
                ratios[text].append(log_word - log_mix)
    return ratios, np.array(lls), log_pi


@pytest.fixture(scope="module")
def reference(model, dataset):
    return brute_force(model, dataset)


def test_log_ratios_match_explicit_per_expert_forward_passes(model, dataset, reference):
    ratios, _, _ = reference
    profiles = expert_profiles(model, dataset, dataset.tokenizer(), min_count=1)
    scores = profiles.word_scores
    assert set(scores.index) == set(ratios)
    assert {"ab,", "gh.", "st!", "12", "2024"} <= set(scores.index)  # punctuation stays on
    for word, occurrences in ratios.items():
        assert scores.loc[word, "occurrences"] == len(occurrences), word
        expected = np.mean(occurrences, axis=0)
        got = scores.loc[word, ["expert_0", "expert_1", "expert_2"]].to_numpy(dtype=float)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=word)
    spread = scores[["expert_0", "expert_1", "expert_2"]].to_numpy()
    assert spread.max() - spread.min() > 0.05  # the experts differ: the ratios are not all 0


@pytest.mark.parametrize("min_count", [2, 3, 5])
def test_the_minimum_count_keeps_exactly_the_words_seen_that_often(model, dataset, reference,
                                                                   min_count):
    ratios, _, _ = reference
    counts = {w: len(r) for w, r in ratios.items()}
    assert min_count in counts.values() and min_count - 1 in counts.values()  # both sides seen
    profiles = expert_profiles(model, dataset, dataset.tokenizer(), min_count=min_count,
                               top_words=100)
    assert set(profiles.word_scores.index) == {w for w, c in counts.items() if c >= min_count}
    assert set(profiles.words["word"]) <= set(profiles.word_scores.index)


def test_each_experts_top_words_are_its_highest_mean_log_ratios_in_order(model, dataset,
                                                                         reference):
    ratios, _, _ = reference
    profiles = expert_profiles(model, dataset, dataset.tokenizer(), min_count=2, top_words=4)
    eligible = {w: np.mean(r, axis=0) for w, r in ratios.items() if len(r) >= 2}
    for k in range(3):
        expected = sorted(eligible, key=lambda w: -eligible[w][k])[:4]
        mine = profiles.words[profiles.words["expert"] == k]
        assert list(mine["word"]) == expected
        assert list(mine["rank"]) == [1, 2, 3, 4]
        np.testing.assert_allclose(mine["log_ratio"], [eligible[w][k] for w in expected],
                                   atol=1e-4)
        assert mine["log_ratio"].is_monotonic_decreasing
    # a ratio never exceeds -log pi_z: the mixture gives the word at least pi_z p_z
    _, _, log_pi = reference
    for k in range(3):
        assert profiles.word_scores[f"expert_{k}"].max() <= -log_pi[k] + 1e-6


def test_top_documents_are_the_highest_posterior_ones(model, dataset):
    profiles = expert_profiles(model, dataset, dataset.tokenizer(), top_documents=3,
                               text_chars=20)
    posteriors = evaluate(model, dataset, progress=False).posteriors.to_numpy()  # (D, K)
    tokenizer = dataset.tokenizer()
    for k in range(3):
        mine = profiles.documents[profiles.documents["expert"] == k]
        expected = sorted(range(len(dataset)), key=lambda d: (-posteriors[d, k], d))[:3]
        assert list(mine["doc"]) == expected
        np.testing.assert_allclose(mine["posterior"], posteriors[expected, k], atol=1e-5)
        for row in mine.itertuples():
            assert row.domain == dataset.domains[dataset.domain_ids[row.doc]]
            assert row.text == " ".join(tokenizer.decode(dataset.document(row.doc)).split())[:20]


def test_the_domains_an_expert_takes_follow_from_the_posteriors(model, dataset):
    profiles = expert_profiles(model, dataset, dataset.tokenizer())
    result = evaluate(model, dataset, progress=False)
    posteriors = result.posteriors.to_numpy()
    winner = posteriors.argmax(1)
    names = np.array([dataset.domains[i] for i in dataset.domain_ids])
    table = profiles.domains.set_index(["expert", "domain"])
    for k in range(3):
        for domain in ("alpha", "beta"):
            row = table.loc[(k, domain)]
            won = int(((winner == k) & (names == domain)).sum())
            assert row["won"] == won
            if (winner == k).any():
                assert row["won_share"] == pytest.approx(won / (winner == k).sum())
            assert row["mass_share"] == pytest.approx(
                posteriors[names == domain, k].sum() / posteriors[:, k].sum(), abs=1e-5)
            assert row["mean_responsibility"] == pytest.approx(
                result.responsibilities.loc[domain, f"expert_{k}"], abs=1e-5)
    summary = profiles.table()
    assert summary["documents won"].sum() == len(dataset)
    for k in range(3):
        mine = profiles.domains[profiles.domains["expert"] == k]
        assert summary.loc[f"expert_{k}", "main domain"] == mine.loc[
            mine["mass_share"].idxmax(), "domain"]


@pytest.mark.parametrize("T, C", [(16, 8), (12, 0)])
def test_token_scores_under_sliding_windows_sum_to_evaluations_document_scores(model, dataset,
                                                                              T, C):
    assert max(dataset.document_length(d) for d in range(len(dataset))) > T  # several windows
    docs = list(range(len(dataset)))
    scores = token_log_probs(model, dataset, docs, tokens_per_sample=T, context_window=C,
                             max_sentences=5)
    lengths = [dataset.document_length(d) for d in docs]
    expected = window_log_likelihoods(
        model, len(docs), lengths, lambda d, s, e: dataset.document(d)[s:e],
        tokens_per_sample=T, context_window=C, max_sentences=7, pad_id=dataset.pad_id).numpy()
    got = np.stack([scores[d].sum(1) for d in docs])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert all((scores[d] < 0).all() for d in docs)  # every token scored, none left at 0


def test_figure_and_report_section_show_each_expert(model, dataset):
    profiles = expert_profiles(model, dataset, dataset.tokenizer(), min_count=2, top_words=5)
    fig = report.expert_profiles_figure(profiles, top_words=3, columns=2)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3
    for k, ax in enumerate(panels):
        top = profiles.words[profiles.words["expert"] == k].head(3)
        assert [t.get_text() for t in ax.get_yticklabels()] == list(top["word"])
        np.testing.assert_allclose([p.get_width() for p in ax.patches], top["log_ratio"])
        assert ax.get_title(loc="left").startswith(f"expert {k}: ")
    section = report.expert_profiles_markdown(profiles, method="sMoElp", top_words=2,
                                              figure="figures/profiles.png")
    assert section.startswith("## What each expert has learnt (sMoElp, test split)")
    assert "![Top words of each expert (sMoElp)](figures/profiles.png)" in section
    for k in range(3):
        line = next(x for x in section.splitlines() if x.startswith(f"| expert_{k} "))
        for word in profiles.words[profiles.words["expert"] == k].head(2)["word"]:
            assert word in line


def test_workbench_profiles_a_trained_method_once(smoke_workbench):
    wb = smoke_workbench()
    profiles = wb.expert_profiles("hMoEup", "valid")
    assert profiles is wb.expert_profiles("hMoEup", "valid")  # kept in memory
    assert profiles.num_experts == 3 and profiles.settings["split"] == "valid"
    assert len(profiles.documents) == 3 * 3
    assert profiles.documents["posterior"].max() <= 1.0


def test_scoring_the_split_in_small_groups_of_documents_changes_nothing(model, dataset,
                                                                        monkeypatch):
    whole = expert_profiles(model, dataset, dataset.tokenizer(), min_count=1)
    monkeypatch.setattr("moelab.eval.profiles.GROUP_TOKENS", 40)  # a few documents per group
    grouped = expert_profiles(model, dataset, dataset.tokenizer(), min_count=1)
    pd.testing.assert_frame_equal(grouped.word_scores.sort_index(),
                                  whole.word_scores.sort_index(), atol=1e-6)
    # batches of other lengths pad differently: float32 rounding, nothing more
    pd.testing.assert_frame_equal(grouped.documents, whole.documents, atol=1e-6)
    pd.testing.assert_frame_equal(grouped.domains, whole.domains, atol=1e-6)
