"""moelab.evaluate and `moelab eval-lm`: sliding windows, mixture/oracle bounds, tables, CLI."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.cli import main
from moelab.data import BinarizedDataset, PreprocessConfig, collate, preprocess
from moelab.evaluate import evaluate, start_log_prior, summarize, windows
from moelab.model import MixtureLM, ModelConfig

T = 64  # the tiny checkpoint's tokens-per-sample (its max_seq_len)


@pytest.fixture(scope="session")
def valid(tiny_bin) -> BinarizedDataset:
    return BinarizedDataset(tiny_bin, "valid")


def random_model(ds: BinarizedDataset, **overrides) -> MixtureLM:
    torch.manual_seed(0)
    base = dict(vocab_size=ds.vocab_size, pad_id=ds.pad_id, num_experts=1, n_layer=1, n_embd=32,
                n_head=2, ffn_dim=64, max_seq_len=48, dropout=0.0)
    return MixtureLM(ModelConfig(**{**base, **overrides})).eval()


# ----------------------------------------------------------------------------- windows


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), T=st.integers(1, 40), C=st.integers(0, 39))
def test_windows_score_every_token_exactly_once(length, T, C):
    C = C % T
    counts = np.zeros(length, dtype=int)
    for i, (start, first, end) in enumerate(windows(length, T, C)):
        assert 0 <= start <= first < end <= length and end - start <= T
        if i == 0:
            assert (start, first) == (0, 0)
        else:  # C tokens of context, then at most T - C new ones
            assert first - start == C and end - first <= T - C
        counts[first:end] += 1
    assert (counts == 1).all()


def test_context_window_zero_equals_plain_chunked_scoring(model, valid):
    result = evaluate(model, valid, tokens_per_sample=T, context_window=0, max_sentences=16,
                      progress=False)
    chunks = valid.chunks(T)
    expected = torch.zeros(len(valid), model.num_experts, dtype=torch.float64)
    for i in range(0, len(chunks), 32):
        batch = collate(valid, chunks[i : i + 32], max_context=0)
        with torch.no_grad():
            ll = model.expert_log_likelihoods(batch.tokens, batch.lengths)  # (B, K)
        expected.index_add_(0, batch.doc_ids, ll.double())
    got = result.documents[[f"expert_{k}" for k in range(model.num_experts)]].to_numpy()
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-3)


def test_results_do_not_depend_on_max_sentences(valid):
    model = random_model(valid, num_experts=2, max_seq_len=T)
    a = evaluate(model, valid, tokens_per_sample=T, context_window=16, max_sentences=1,
                 progress=False)
    b = evaluate(model, valid, tokens_per_sample=T, context_window=16, max_sentences=13,
                 progress=False)
    np.testing.assert_allclose(a.documents.drop(columns="domain").to_numpy(float),
                               b.documents.drop(columns="domain").to_numpy(float),
                               rtol=1e-5, atol=1e-3)
    # every token is scored exactly once, context or not
    lengths = [valid.document_length(i) for i in range(len(valid))]
    assert a.documents["tokens"].tolist() == lengths
    assert int(a.summary["tokens"]) == sum(lengths) == int(valid.offsets[-1])


def test_mixture_lies_between_oracle_plus_min_log_prior_and_oracle(model, valid):
    result = evaluate(model, valid, tokens_per_sample=T, context_window=32, progress=False)
    docs = result.documents
    mixture, oracle = docs["mixture"].to_numpy(), docs["oracle"].to_numpy()
    assert (mixture <= oracle + 1e-9).all()
    assert (mixture >= oracle + result.log_prior.min() - 1e-9).all()
    ppl = result.perplexity
    assert list(ppl.columns) == ["mixture", "oracle", "expert_0", "expert_1", "expert_2"]
    assert list(ppl.index) == ["overall", "alpha", "beta", "gamma"]
    assert (ppl["oracle"] <= ppl["mixture"] + 1e-9).all()
    # the oracle is at least as good as every expert alone
    assert (ppl["oracle"].to_numpy()[:, None] <= ppl.filter(like="expert_").to_numpy() + 1e-9).all()


def test_dense_model_mixture_oracle_and_expert_equal_plain_log_likelihood(valid):
    model = random_model(valid, num_experts=1, max_seq_len=48)
    result = evaluate(model, valid, tokens_per_sample=48, context_window=0, progress=False)
    expected = []
    for i in range(len(valid)):
        doc, total = torch.from_numpy(valid.document(i)), 0.0
        for s in range(0, len(doc), 48):
            x = doc[s : s + 48]
            inputs = torch.cat([torch.tensor([valid.vocab_size]), x[:-1]])[None]  # <expert_0>
            with torch.no_grad():
                logp = F.log_softmax(model(inputs)[0].double(), dim=-1)
            total += float(logp.gather(1, x[:, None]).sum())
        expected.append(total)
    docs = result.documents
    for column in ("mixture", "oracle", "expert_0"):
        np.testing.assert_allclose(docs[column].to_numpy(), expected, rtol=1e-5)
    assert result.posteriors["expert_0"].eq(1.0).all()
    row = result.perplexity.loc["overall"]
    assert row["mixture"] == pytest.approx(row["oracle"]) == pytest.approx(row["expert_0"])
    assert row["mixture"] == pytest.approx(math.exp(-sum(expected) / valid.offsets[-1]))


def test_mixture_uses_the_gating_networks_prior_at_the_document_start(valid):
    model = random_model(valid, num_experts=3, gating=True, gating_dim=32)
    with torch.no_grad():
        model.gating.fc2.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))  # clearly not uniform
    log_pi = start_log_prior(model)
    empty = model.log_prior(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(log_pi, empty[0].double())
    result = evaluate(model, valid, context_window=8, progress=False)
    ll = result.documents[["expert_0", "expert_1", "expert_2"]].to_numpy()
    expected = torch.logsumexp(torch.from_numpy(ll) + log_pi, dim=1).numpy()
    np.testing.assert_allclose(result.documents["mixture"].to_numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(result.posteriors.sum(axis=1), 1.0, rtol=1e-9)


# ----------------------------------------------------------------------------- tables


def test_summary_tables_clusters_and_usage():
    # 6 documents, 2 domains, K=3: documents 0-2 won by expert 2, documents 3-5 by expert 0
    ll = np.full((6, 3), -100.0)
    ll[:3, 2] = -10.0
    ll[3:, 0] = -10.0
    log_pi = np.log(np.full(3, 1 / 3))
    result = summarize(ll, log_pi, np.full(6, 10), np.array([0, 0, 0, 1, 1, 1]), ["a", "b"],
                       tokens_per_sample=8, context_window=0)
    assert result.clusters["purity"] == result.clusters["nmi"] == result.clusters["ari"] == 1.0
    assert result.responsibilities.loc["a", "expert_2"] == pytest.approx(1.0)
    assert result.responsibilities.loc["b", "expert_0"] == pytest.approx(1.0)
    np.testing.assert_allclose(result.usage["share"], [0.5, 0.0, 0.5])
    assert result.summary["usage_entropy"] == pytest.approx(math.log(2))
    assert result.summary["experts_used"] == 2
    assert result.documents["winner"].tolist() == [2, 2, 2, 0, 0, 0]
    # one expert wins a single document of 6 (1/6 >= 1/(4K) = 1/12): it counts as used
    ll[0] = [-100.0, -10.0, -100.0]
    assert summarize(ll, log_pi, np.full(6, 10), np.zeros(6, dtype=int), ["a"],
                     tokens_per_sample=8, context_window=0).summary["experts_used"] == 3


def test_unknown_domains_give_nan_clusters_with_a_note():
    ll = np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))
    result = summarize(ll, np.log([0.5, 0.5]), np.array([5, 5]), np.array([0, 0]), ["unknown"],
                       tokens_per_sample=8, context_window=0)
    assert result.clusters.isna().all()
    assert any("domain" in note for note in result.notes)
    assert list(result.perplexity.index) == ["overall", "unknown"]


# ----------------------------------------------------------------------------- command line

SEED_EVAL = """fairseq-eval-lm data-bin/biomed/ \
--path checkpoints/checkpoint_best.pt \
--max-sentences 2 \
--tokens-per-sample 512 \
--context-window 400 \
--task language_model_moe  \
--user-dir ./examples/language_model_moe/src/ \
--num-experts 10 \
--mean-pool-gating-network \
--mean-pool-gating-network-encoder-dim 512 \
--mean-pool-gating-network-dropout 0.0"""


def seed_eval_argv(data: Path, ckpt: Path, **replace: str) -> list[str]:
    """The seed README's eval-lm command, `fairseq-X` -> `moelab X`, sizes shrunk to fit."""
    argv = shlex.split(SEED_EVAL)
    assert argv[0] == "fairseq-eval-lm"
    argv = ["eval-lm", *argv[1:]]
    values = {"data-bin/biomed/": str(data), "checkpoints/checkpoint_best.pt": str(ckpt),
              "512": str(T), "400": "40", "10": "3", **replace}
    return [values.get(a, a) for a in argv]


def test_seed_eval_lm_command_runs_and_writes_results(tiny_bin, ckpt, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("mine")
    argv = [*seed_eval_argv(tiny_bin, ckpt), "--results-dir", str(results), "--no-progress-bar"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "mixture" in out and "oracle" in out and "a bound" in out
    for word in ("alpha", "beta", "gamma", "purity", "NMI", "ARI", "experts used",
                 "| Loss (base 2)", "Perplexity"):
        assert word in out
    assert "--user-dir" in err and "--task" in err  # explained, not silently dropped
    assert (results / "keep.txt").read_text() == "mine"
    for name in ("perplexity", "documents", "posteriors", "responsibilities", "usage"):
        assert (results / f"test_{name}.csv").stat().st_size > 0
    data = json.loads((results / "test_eval.json").read_text())
    assert set(data["perplexity"]) == {"overall", "alpha", "beta", "gamma"}
    assert data["summary"]["context_window"] == 40
    assert any("bound" in note for note in data["notes"])


def test_eval_lm_valid_subset_matches_python_api(tiny_bin, ckpt, model, valid, capsys):
    assert main(["eval-lm", str(tiny_bin), "--path", str(ckpt), "--gen-subset", "valid",
                 "--context-window", "16", "--no-progress-bar"]) == 0
    out = capsys.readouterr().out
    api = evaluate(model, valid, context_window=16, progress=False)
    assert f"Perplexity: {api.perplexity.loc['overall', 'mixture']:.2f}" in out


@pytest.mark.parametrize("flags, message", [
    (["--context-window", "64"], "--context-window (64) must be smaller than --tokens-per-sample"),
    (["--tokens-per-sample", "65"], "trained with --tokens-per-sample 64"),
    (["--num-experts", "10"], "K=3"),
    (["--method", "sMoElp"], "trained with --method hMoEup"),
    (["--task", "translation"], "--task translation is not supported"),
])
def test_eval_lm_bad_flags_are_clear_errors(tiny_bin, ckpt, capsys, flags, message):
    assert main(["eval-lm", str(tiny_bin), "--path", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_checkpoint_and_data_bin_with_different_tokenizers(tiny_corpus, ckpt, tmp_path, capsys):
    other = tmp_path / "other-bin"
    preprocess(PreprocessConfig(destdir=str(other), data=str(tiny_corpus), vocab_size=400,
                                valid_fraction=0.15, test_fraction=0.15))
    assert main(["eval-lm", str(other), "--path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and "sha256" in err
    assert main(["interactive", str(other), "--path", str(ckpt), "--prompt", "x"]) == 2
    assert "different tokenizers" in capsys.readouterr().err


def test_checkpoint_whose_config_does_not_fit_its_weights_is_one_clear_line(
        tiny_bin, ckpt, tmp_path, capsys):
    from moelab.train.checkpoint import save_checkpoint

    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["model_config"]["n_layer"] += 1  # an altered file: one block has no weights
    altered = tmp_path / "altered.pt"
    save_checkpoint(altered, checkpoint)
    assert main(["eval-lm", str(tiny_bin), "--path", str(altered)]) == 2
    err = capsys.readouterr().err
    assert "do not fit together" in err and len(err.strip().splitlines()) == 1
