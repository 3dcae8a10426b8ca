"""moelab.eval.lm and `moelab eval-lm`: sliding windows, mixture/oracle bounds, tables, CLI."""

from __future__ import annotations

import json
import math
import re
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
from moelab.eval.lm import evaluate, summarize
from moelab.eval.windows import window_log_likelihoods, windows
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
    log_pi = model.start_log_prior()
    empty = model.log_prior(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(log_pi, empty[0].double())
    result = evaluate(model, valid, context_window=8, progress=False)
    ll = result.documents[["expert_0", "expert_1", "expert_2"]].to_numpy()
    expected = torch.logsumexp(torch.from_numpy(ll) + log_pi, dim=1).numpy()
    np.testing.assert_allclose(result.documents["mixture"].to_numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(result.posteriors.sum(axis=1), 1.0, rtol=1e-9)


# ----------------------------------------------------------------------------- per-token reference


def brute_log_likelihoods(model: MixtureLM, docs, T: int, C: int) -> np.ndarray:
    """log p(doc | z) (D, K), token by token, each token's window rebuilt from scratch.

    fairseq-eval-lm's windows (docs/design.md section 3): the first holds tokens 0..T-1 with nothing
    before them; each later one scores T - C new tokens, starting at T, T + (T - C), ..., after
    the C tokens just before them. Token t of a later window thus reads <expert_z> and then the
    document from (its window's first new token - C) to t - 1.
    """
    V, K = model.config.vocab_size, model.num_experts
    by_length: dict[int, list] = {}  # context length -> [(doc, context, target)]
    for d, doc in enumerate(docs):
        doc = [int(x) for x in doc]
        for t, target in enumerate(doc):
            first_new = 0 if t < T else T + (t - T) // (T - C) * (T - C)
            context = doc[max(first_new - C, 0) : t]
            by_length.setdefault(len(context), []).append((d, context, target))
    out = np.zeros((len(docs), K))
    with torch.no_grad():
        for group in by_length.values():  # one forward per context length, not per token
            inputs = torch.tensor([[V + k, *context] for _, context, _ in group for k in range(K)])
            logits = model.output_logits(model.transformer.hidden(inputs)[:, -1])  # (N*K, V)
            logp = F.log_softmax(logits.double(), dim=-1).view(len(group), K, -1)
            targets = torch.tensor([target for _, _, target in group])
            picked = logp[torch.arange(len(group)), :, targets]  # (N, K)
            np.add.at(out, [d for d, _, _ in group], picked.numpy())
    return out


@pytest.mark.parametrize("T_, C", [(16, 0), (16, 5), (12, 11), (10, 3), (7, 1)])
def test_sliding_windows_match_a_per_token_reference(model, valid, T_, C, one_thread):
    # documents of several windows, of one (T = 16) and one token more, shorter than one, 1 token
    sizes = [61, 5, 16, 17, 1, 40]
    docs = [np.asarray(valid.document(i)[:n], dtype=np.int64) for i, n in enumerate(sizes)]
    got = window_log_likelihoods(model, len(docs), sizes, lambda d, s, e: docs[d][s:e],
                                 tokens_per_sample=T_, context_window=C, max_sentences=3,
                                 pad_id=valid.pad_id)
    assert got.shape == (len(docs), model.num_experts) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), brute_log_likelihoods(model, docs, T_, C),
                               rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def scored_valid(model, valid):
    """evaluate() on the valid split with context (T=24, C=10) and the per-token reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores run many times slower
    try:
        result = evaluate(model, valid, tokens_per_sample=24, context_window=10, max_sentences=5,
                          progress=False)
        ll = brute_log_likelihoods(model, [valid.document(i) for i in range(len(valid))], 24, 10)
    finally:
        torch.set_num_threads(threads)
    return result, ll


def test_evaluate_scores_each_document_like_the_per_token_reference(scored_valid, valid):
    result, ll = scored_valid
    docs = result.documents
    K = ll.shape[1]
    np.testing.assert_allclose(docs[[f"expert_{k}" for k in range(K)]].to_numpy(), ll,
                               rtol=1e-5, atol=1e-3)
    assert docs["tokens"].tolist() == [valid.document_length(i) for i in range(len(valid))]


def test_perplexities_follow_the_design_formulas(scored_valid, valid):
    """mixture = exp(-sum_doc logsumexp_z [log pi_z + log p(doc | z)] / tokens), oracle = the
    best expert per document, expert k alone; overall and per domain, from the reference."""
    result, ll = scored_valid
    D, K = ll.shape
    log_pi = np.full(K, -math.log(K))  # hMoEup: the uniform prior
    np.testing.assert_allclose(result.log_prior, log_pi, rtol=1e-6)  # float32 prior
    tokens = np.array([valid.document_length(i) for i in range(D)], dtype=float)
    domains = np.array([valid.domains[i] for i in valid.domain_ids])
    expected = {}
    for name in ("overall", *valid.domains):
        rows = np.ones(D, bool) if name == "overall" else domains == name
        mixture = 0.0
        for d in np.flatnonzero(rows):  # logsumexp by hand, shifted by the largest term
            joint = [ll[d, k] + log_pi[k] for k in range(K)]
            mixture += max(joint) + math.log(sum(math.exp(j - max(joint)) for j in joint))
        oracle = sum(max(ll[d]) for d in np.flatnonzero(rows))
        n = tokens[rows].sum()
        expected[name] = [math.exp(-mixture / n), math.exp(-oracle / n),
                          *(math.exp(-ll[rows, k].sum() / n) for k in range(K))]
    table = result.perplexity
    assert list(table.index) == ["overall", *valid.domains]
    np.testing.assert_allclose(table.to_numpy(), np.array([expected[i] for i in table.index]),
                               rtol=1e-5)
    # the three numbers really differ here: a mean of expert perplexities, or the oracle, passed
    # off as the mixture would fail above
    overall = expected["overall"]
    assert overall[1] < overall[0] * 0.999
    assert abs(np.mean(overall[2:]) - overall[0]) > 1e-3 * overall[0]


def test_evaluation_runs_without_dropout_and_restores_the_models_mode(valid, one_thread):
    model = random_model(valid, num_experts=2, max_seq_len=32, dropout=0.5,
                         attention_dropout=0.5, gating=True, gating_dim=32, gating_dropout=0.5)
    with torch.no_grad():  # the empty context's prior passes through the gating dropout
        model.gating.fc1.bias.normal_()
        model.gating.fc2.weight.normal_()
    # dropout really moves this model's numbers in train mode
    model.train()
    x = torch.cat([torch.tensor([[valid.vocab_size]]), torch.from_numpy(
        np.asarray(valid.document(0)[:20], dtype=np.int64))[None]], dim=1)
    empty = (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        assert not torch.equal(model.log_prior(*empty), model.log_prior(*empty))

    def run():
        r = evaluate(model, valid, tokens_per_sample=32, context_window=8, progress=False)
        return r.documents.drop(columns="domain").to_numpy(float), r.log_prior

    first, prior = run()
    assert model.training and all(m.training for m in model.modules())  # mode restored
    again, prior_again = run()
    model.eval()
    in_eval, prior_eval = run()
    assert not any(m.training for m in model.modules())  # eval mode stays eval
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, in_eval)
    np.testing.assert_array_equal(prior, prior_again)
    np.testing.assert_array_equal(prior, prior_eval)


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
    """The original fairseq workflow's eval-lm command, `fairseq-X` -> `moelab X`, sizes shrunk
    to fit."""
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


def closing_line(out: str) -> tuple[float, float]:
    """The loss and perplexity of fairseq-eval-lm's last line, as printed."""
    match = re.search(r"^\| Loss \(base 2\): (\S+), Perplexity: (\S+)$", out, re.MULTILINE)
    assert match, out
    return float(match[1]), float(match[2])


def test_eval_lm_loss_is_the_base_2_log_of_its_perplexity(tiny_bin, ckpt, capsys):
    """Scripts that parse fairseq's line read the loss in bits: log2(perplexity), not ln."""
    assert main(["eval-lm", str(tiny_bin), "--path", str(ckpt), "--gen-subset", "valid",
                 "--no-progress-bar"]) == 0
    loss, perplexity = closing_line(capsys.readouterr().out)
    assert perplexity > 2  # ln and log2 differ by more than the printed rounding
    assert loss == pytest.approx(math.log2(perplexity), abs=1e-3)


def test_eval_lm_test_subset_matches_python_api(tiny_bin, ckpt, model, valid, capsys):
    """--gen-subset chooses the split scored, not only the title: test's perplexity is test's."""
    assert main(["eval-lm", str(tiny_bin), "--path", str(ckpt), "--gen-subset", "test",
                 "--no-progress-bar"]) == 0
    _, perplexity = closing_line(capsys.readouterr().out)
    test = evaluate(model, BinarizedDataset(tiny_bin, "test"), progress=False)
    other = evaluate(model, valid, progress=False)
    expected = test.perplexity.loc["overall", "mixture"]
    assert round(expected, 2) != round(other.perplexity.loc["overall", "mixture"], 2)
    assert perplexity == round(expected, 2)


def test_eval_lm_results_record_the_settings_they_were_made_with(tiny_bin, ckpt, tmp_path):
    """{split}_eval.json says how the numbers were made, context window included."""
    results = tmp_path / "results"
    assert main(["eval-lm", str(tiny_bin), "--path", str(ckpt), "--gen-subset", "valid",
                 "--context-window", "16", "--max-sentences", "3", "--results-dir",
                 str(results), "--no-progress-bar"]) == 0
    settings = json.loads((results / "valid_eval.json").read_text())["settings"]
    assert settings["context_window"] == 16
    assert settings["tokens_per_sample"] == T and settings["max_sentences"] == 3
    assert settings["path"] == str(ckpt) and settings["data"] == str(tiny_bin)


@pytest.fixture(scope="module")
def lp_ckpt(tiny_bin, tmp_path_factory) -> Path:
    """A tiny hMoElp checkpoint whose gating network is 16 wide (one update is enough)."""
    from moelab.train import train

    save_dir = tmp_path_factory.mktemp("lp-run")
    result = train(str(tiny_bin), arch="tiny", method="hMoElp", num_experts=2, max_update=1,
                   decoder_layers=1, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                   decoder_attention_heads=2, tokens_per_sample=32, max_tokens=256,
                   mean_pool_gating_network=True, mean_pool_gating_network_encoder_dim=16,
                   save_dir=str(save_dir), device="cpu", progress_bar=False)
    return result.run.checkpoint_path


def test_eval_lm_refuses_a_gating_width_the_learned_prior_checkpoint_lacks(tiny_bin, lp_ckpt,
                                                                           capsys):
    argv = ["eval-lm", str(tiny_bin), "--path", str(lp_ckpt), "--gen-subset", "valid",
            "--no-progress-bar", "--mean-pool-gating-network"]
    assert main([*argv, "--mean-pool-gating-network-encoder-dim", "24"]) == 2
    err = capsys.readouterr().err
    assert "--mean-pool-gating-network-encoder-dim 24" in err and "width 16" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*argv, "--mean-pool-gating-network-encoder-dim", "16"]) == 0  # its own width


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


# ----------------------------------------------------------------------------- confidence


def brute_confidence(ll, log_pi, tokens):
    """mean max posterior, mean posterior entropy (nats), expert spread (nats/token), by loops."""
    tops, entropies, spreads = [], [], []
    for doc, n in zip(ll, tokens, strict=True):
        joint = [float(a) + float(b) for a, b in zip(doc, log_pi, strict=True)]
        norm = math.log(sum(math.exp(j - max(joint)) for j in joint)) + max(joint)
        post = [math.exp(j - norm) for j in joint]
        tops.append(max(post))
        entropies.append(-sum(p * math.log(p) for p in post if p > 0))
        per_token = [float(x) / int(n) for x in doc]
        mean = sum(per_token) / len(per_token)
        spreads.append(math.sqrt(sum((x - mean) ** 2 for x in per_token) / len(per_token)))
    return (sum(tops) / len(tops), sum(entropies) / len(entropies),
            sum(spreads) / len(spreads))


def confidence(result):
    c = result.clusters
    return c["mean_max_posterior"], c["mean_posterior_entropy"], c["expert_spread"]


def two_domain_result(ll, tokens=None, log_pi=None, domains=(0, 0, 0, 1, 1, 1)):
    D, K = ll.shape
    return summarize(ll, np.log(np.full(K, 1 / K)) if log_pi is None else log_pi,
                     np.full(D, 100) if tokens is None else np.asarray(tokens),
                     np.asarray(domains), ["a", "b"], tokens_per_sample=8, context_window=0)


def test_confidence_of_a_flat_posterior_is_one_over_k_with_zero_spread():
    # every expert gives each document the same likelihood: p(z | doc) = 1/3 exactly
    ll = np.repeat(np.array([[-250.0], [-300.0], [-220.0], [-410.0], [-390.0], [-260.0]]), 3, 1)
    top, entropy, spread = confidence(two_domain_result(ll))
    assert top == pytest.approx(1 / 3)
    assert entropy == pytest.approx(math.log(3))
    assert spread == pytest.approx(0.0, abs=1e-12)


def test_confidence_of_a_sharp_posterior_is_near_one_with_a_wide_spread():
    ll = np.full((6, 3), -400.0)
    ll[:3, 0] = ll[3:, 2] = -200.0  # the winner is 200 nats (2 nats/token) ahead
    top, entropy, spread = confidence(two_domain_result(ll))
    assert top == pytest.approx(1.0)
    assert entropy == pytest.approx(0.0, abs=1e-9)
    # per token: two experts at -4, one at -2: population std sqrt(8/9) ~ 0.943
    assert spread == pytest.approx(math.sqrt(8 / 9))


def test_confidence_matches_brute_force_with_a_learned_prior_and_uneven_documents():
    rng = np.random.default_rng(3)
    ll = -rng.uniform(50, 60, (6, 4))  # margins of a few nats: posteriors neither flat nor sharp
    tokens = np.array([10, 25, 7, 40, 13, 19])
    log_pi = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    got = confidence(two_domain_result(ll, tokens, log_pi))
    expected = brute_confidence(ll, log_pi, tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert 0.25 < got[0] < 0.999 and 0 < got[1] < math.log(4)  # a real test of the middle
    # the prior moves the posterior: the confidence is of p(z | doc), not of the likelihoods
    flat_prior = np.log(np.full(4, 0.25))
    assert confidence(two_domain_result(ll, tokens, flat_prior))[0] == pytest.approx(
        brute_confidence(ll, flat_prior, tokens)[0])
    assert brute_confidence(ll, flat_prior, tokens)[0] != pytest.approx(expected[0])


def test_a_single_expert_is_sure_with_no_spread_and_no_warning():
    from moelab.eval.lm import format_result

    ll = np.array([[-300.0], [-200.0], [-250.0], [-100.0]])
    result = summarize(ll, np.zeros(1), np.full(4, 50), np.array([0, 0, 1, 1]), ["a", "b"],
                       tokens_per_sample=8, context_window=0)
    assert confidence(result) == (pytest.approx(1.0), pytest.approx(0.0), pytest.approx(0.0))
    assert "warning" not in format_result(result)


def test_flat_posterior_with_aligned_argmax_is_reported_with_low_confidence(tmp_path):
    """The sMoElp incident: NMI = ARI = purity = 1 from a posterior that is almost a coin toss."""
    from moelab.eval.lm import format_result, write_results

    ll = np.full((6, 2), -1000.0)  # 500 tokens per document
    ll[:3, 0] += 0.5
    ll[3:, 1] += 0.5  # each domain's own expert ahead by half a nat: argmax aligned, barely
    result = two_domain_result(ll, tokens=np.full(6, 500))
    c = result.clusters
    assert c["purity"] == c["nmi"] == c["ari"] == 1.0
    top, entropy, spread = confidence(result)
    assert top == pytest.approx(1 / (1 + math.exp(-0.5)))  # ~0.62
    assert entropy > 0.9 * math.log(2)
    assert spread == pytest.approx(0.25 / 500)
    text = format_result(result)
    clusters_line = next(i for i, line in enumerate(text.splitlines()) if "NMI 1.000" in line)
    beside = "\n".join(text.splitlines()[clusters_line : clusters_line + 3])
    assert "mean max posterior 0.622" in beside and "expert spread 0.0005" in beside
    assert "flat" in beside and "must not be read as a clean split" in beside
    assert text.count("must not be read as a clean split") == 1  # not repeated among the notes
    write_results(result, tmp_path, "test")
    data = json.loads((tmp_path / "test_eval.json").read_text())
    assert data["clusters"]["mean_max_posterior"] == pytest.approx(top)
    assert data["clusters"]["mean_posterior_entropy"] == pytest.approx(entropy)
    assert data["clusters"]["expert_spread"] == pytest.approx(spread)
    assert any("clean split" in note for note in data["notes"])


def test_a_sure_posterior_gets_no_warning():
    from moelab.eval.lm import format_result

    ll = np.full((6, 2), -1000.0)
    ll[:3, 0] += 50.0
    ll[3:, 1] += 50.0  # 0.1 nats/token ahead over 500 tokens: sure, and the experts differ
    result = two_domain_result(ll, tokens=np.full(6, 500))
    assert confidence(result)[0] == pytest.approx(1.0)
    text = format_result(result)
    assert "confidence: mean max posterior 1.000" in text
    assert "warning" not in text and "clean split" not in text
    assert not any("clean split" in note for note in result.notes)


def test_experts_that_barely_differ_are_flagged_even_when_the_posterior_is_sharp():
    from moelab.eval.lm import format_result

    ll = np.full((6, 2), -30000.0)  # 10,000-token documents
    ll[:3, 0] += 40.0
    ll[3:, 1] += 40.0  # 40 nats per document (posterior ~1), but 0.004 nats/token
    result = two_domain_result(ll, tokens=np.full(6, 10_000))
    top, _, spread = confidence(result)
    assert top == pytest.approx(1.0) and spread == pytest.approx(0.002)
    warning = next(line for line in format_result(result).splitlines() if "warning" in line)
    assert "0.0020 nats/token < 0.01" in warning and "mean max posterior" not in warning
    assert "experts barely differ" in warning and "flat" not in warning  # the posterior is sure


def test_a_flat_posterior_is_flagged_even_when_the_experts_differ_per_token():
    from moelab.eval.lm import format_result

    ll = np.full((6, 2), -40.0)  # 10-token documents
    ll[:3, 0] += 0.5
    ll[3:, 1] += 0.5  # 0.05 nats/token apart (spread 0.025), yet only half a nat per document
    result = two_domain_result(ll, tokens=np.full(6, 10))
    top, _, spread = confidence(result)
    assert top == pytest.approx(1 / (1 + math.exp(-0.5))) and spread == pytest.approx(0.025)
    warning = next(line for line in format_result(result).splitlines() if "warning" in line)
    assert "mean max posterior 0.622 < 0.9" in warning and "nats/token" not in warning


def test_unknown_domains_report_no_clustering_and_no_confidence_warning():
    from moelab.eval.lm import format_result

    ll = np.zeros((2, 2))  # flat, but there is no clustering to misread
    result = summarize(ll, np.log([0.5, 0.5]), np.array([5, 5]), np.array([0, 0]), ["unknown"],
                       tokens_per_sample=8, context_window=0)
    assert result.clusters[["mean_max_posterior", "expert_spread"]].isna().all()
    text = format_result(result)
    assert "clusters: n/a" in text and "clean split" not in text
