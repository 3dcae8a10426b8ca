"""Routed inference (moelab.eval.routing) and eval-lm's --routing, --prior, --latent: every number
is checked against a brute-force computation on a tiny model (each token scored by its own forward
of its window's text, the formulas written out per document)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from moelab.cli import main
from moelab.data import BinarizedDataset, TrainBatches
from moelab.eval import evaluate_run
from moelab.eval.lm import describe_routing, evaluate, format_result
from moelab.eval.routing import Routing, parse_routing, routing_curve
from moelab.model import MixtureLM, ModelConfig
from moelab.train import Run
from moelab.train.distributed import DistInfo
from moelab.train.method import Method
from moelab.train.validation import validate

T, C = 24, 10  # windows of 24 tokens, 10 of context in later ones: prefixes cross windows


@pytest.fixture(scope="module")
def valid(tiny_bin) -> BinarizedDataset:
    return BinarizedDataset(tiny_bin, "valid")


@pytest.fixture(scope="module")
def test_split(tiny_bin) -> BinarizedDataset:
    return BinarizedDataset(tiny_bin, "test")


def gated_model(ds: BinarizedDataset, max_seq_len: int = T) -> MixtureLM:
    """A random K=3 model with a learned prior that depends on the context and is far from
    uniform at the document start."""
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(vocab_size=ds.vocab_size, pad_id=ds.pad_id, num_experts=3,
                                  n_layer=1, n_embd=32, n_head=2, ffn_dim=64,
                                  max_seq_len=max_seq_len, dropout=0.0, gating=True,
                                  gating_dim=16)).eval()
    with torch.no_grad():
        model.gating.fc2.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
        model.gating.fc1.weight.mul_(100)  # the context moves the prior a lot
        model.gating.fc2.weight.mul_(20)
        model.transformer.tok_emb.weight[ds.vocab_size:].mul_(30)  # experts that differ
    return model


# ----------------------------------------------------------------------------- brute force


def brute_token_log_probs(model: MixtureLM, doc: np.ndarray, T: int, C: int) -> np.ndarray:
    """log p(x_t | its window's text before t, z), (n, K), one forward per token and expert.

    fairseq-eval-lm's windows written out: token t < T reads <expert_z> and x_0..x_t-1; a later
    token reads <expert_z> then the C tokens before its window's first new token and the
    window's tokens before t; windows' first new tokens are T, T + (T - C), ...
    """
    V, K = model.config.vocab_size, model.num_experts
    doc = [int(x) for x in doc]
    out = np.zeros((len(doc), K))
    with torch.no_grad():
        for t, target in enumerate(doc):
            first_new = 0 if t < T else T + (t - T) // (T - C) * (T - C)
            context = doc[max(first_new - C, 0) : t]
            inputs = torch.tensor([[V + k, *context] for k in range(K)])  # (K, 1 + context)
            logits = model.output_logits(model.transformer.hidden(inputs)[:, -1])  # (K, V)
            out[t] = F.log_softmax(logits.double(), dim=-1)[:, target].numpy()
    return out


def lse(values) -> float:
    values = list(values)
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def brute_start_prior(model: MixtureLM) -> np.ndarray:
    with torch.no_grad():
        return model.log_prior(torch.zeros(1, 0, dtype=torch.long),
                               torch.zeros(1, dtype=torch.long))[0].double().numpy()


def brute_routing(tokens: list[np.ndarray], log_pi: np.ndarray, M: int, top_k: int,
                  domains: list[str], T: int, C: int) -> dict:
    """Every routed figure, document by document, from the per-token scores."""
    K = len(log_pi)
    per_doc, cost_full, cost_routed = [], 0, 0
    for d, tok in enumerate(tokens):
        n = len(tok)
        if n <= M:
            continue
        doc_ll = tok.sum(0)
        prefix_ll = tok[:M].sum(0)
        prefix_post = [log_pi[k] + prefix_ll[k] for k in range(K)]
        chosen = sorted(range(K), key=lambda k: (-prefix_post[k], k))[:top_k]
        norm = lse(prefix_post[k] for k in chosen)
        routed = lse(prefix_post[k] - norm + tok[M:, k].sum() for k in chosen)
        full = lse(log_pi[k] + doc_ll[k] for k in range(K)) - lse(prefix_post)
        winner = max(range(K), key=lambda k: log_pi[k] + doc_ll[k])
        per_doc.append(dict(doc=d, domain=domains[d], tokens=n - M, mixture=full, routed=routed,
                            chosen=chosen, winner=winner))
        # the windows each pass runs, counted one position per expert
        first_window = True
        start = 0
        while start < n:  # window [s, e) scoring [f, e)
            if first_window:
                s, f, e = 0, 0, min(T, n)
                first_window = False
            else:
                s, f, e = start - C, start, min(start + T - C, n)
            cost_full += K * (e - s)
            if f < M:
                cost_routed += K * (min(e, M) - s)
            if e > M:
                cost_routed += top_k * (e - s)
            start = e
    return dict(docs=per_doc, cost_full=cost_full, cost_routed=cost_routed,
                tokens=sum(len(tokens[r["doc"]]) for r in per_doc))


def brute_table(per_doc: list[dict], name: str | None = None) -> dict:
    rows = [r for r in per_doc if name in (None, r["domain"])]
    n = sum(r["tokens"] for r in rows)
    full, routed = -sum(r["mixture"] for r in rows) / n, -sum(r["routed"] for r in rows) / n
    return {"documents": len(rows), "tokens": n, "mixture": math.exp(full),
            "routed": math.exp(routed), "gap": routed - full,
            "accuracy": np.mean([r["chosen"][0] == r["winner"] for r in rows]),
            "winner_in_chosen": np.mean([r["winner"] in r["chosen"] for r in rows])}


@pytest.fixture(scope="module")
def trained_tokens(model, valid):
    """The tiny trained hMoEup (K=3) scored token by token on valid, windows (T, C)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [brute_token_log_probs(model, valid.document(i), T, C) for i in range(len(valid))]
    finally:
        torch.set_num_threads(threads)


def domain_names(ds: BinarizedDataset) -> list[str]:
    return [ds.domains[i] for i in ds.domain_ids]


# ----------------------------------------------------------------------------- the flag


@pytest.mark.parametrize("text, expected", [
    ("full", None), ("prefix:16", Routing(16, 1)), ("topk:2", Routing(0, 2)),
    ("prefix:8,topk:2", Routing(8, 2)), ("topk:2,prefix:8", Routing(8, 2)),
])
def test_routing_schemes_parse_to_a_prefix_and_a_number_of_experts(text, expected):
    assert parse_routing(text) == expected
    if expected is not None:
        assert parse_routing(str(expected)) == expected  # the label reads back


@pytest.mark.parametrize("text, message", [
    ("prefix:0", "at least one token"), ("topk:0", "K' >= 1"), ("foo:3", "not a routing scheme"),
    ("prefix:x", "not a routing scheme"), ("prefix:3,prefix:4", "gives prefix twice"),
    ("full,topk:2", "takes no prefix or topk"), ("", "not a routing scheme"),
])
def test_bad_routing_schemes_are_refused_with_what_to_use(text, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_routing(text)
    assert " use " in str(error.value) or " give " in str(error.value)  # what to do instead


def test_more_experts_than_the_model_has_are_refused(model, valid):
    with pytest.raises(ValueError, match=r"K' = 4 is more experts than the model has \(K = 3\)"):
        evaluate(model, valid, routing="topk:4", progress=False)


def data_bin_without_valid(tiny_bin, tmp_path):
    copy = tmp_path / "no-valid"
    shutil.copytree(tiny_bin, copy)
    meta = json.loads((copy / "meta.json").read_text())
    del meta["splits"]["valid"]
    (copy / "meta.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("flags, message", [
    (["--routing", "prefix:0"], "the prefix must hold at least one token"),
    (["--routing", "topk:0"], "keep at least one expert"),
    (["--routing", "topk:4"], "more experts than the model has (K = 3)"),
    (["--routing", "first:3"], "'first:3' is not a routing scheme"),
    (["--routing", "prefix:8", "--latent", "chunk"], "use --latent document with --routing"),
    (["--prior", "cached"], "has none (it has test, train): preprocess with --validpref"),
])
def test_eval_lm_refuses_bad_routing_prior_and_latent_in_one_line(tiny_bin, ckpt, tmp_path,
                                                                  capsys, flags, message):
    data = data_bin_without_valid(tiny_bin, tmp_path) if "cached" in flags else tiny_bin
    assert main(["eval-lm", str(data), "--path", str(ckpt), "--no-progress-bar", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--prior", "--latent"])
def test_eval_lm_refuses_an_unknown_prior_or_latent(tiny_bin, ckpt, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["eval-lm", str(tiny_bin), "--path", str(ckpt), flag, "sometimes"])
    assert exit_.value.code == 2
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- routed figures


@pytest.mark.parametrize("M, top_k", [(5, 1), (30, 2), (340, 1), (17, 3), (2, 2)])
def test_routed_figures_match_brute_force(model, valid, trained_tokens, M, top_k, one_thread):
    """Prefixes inside the first window, across window boundaries and longer than half the
    documents (those are left out and counted); K' = K gives the full mixture back."""
    result = evaluate(model, valid, tokens_per_sample=T, context_window=C, max_sentences=7,
                      routing=f"prefix:{M},topk:{top_k}", progress=False)
    log_pi = np.full(3, -math.log(3))
    brute = brute_routing(trained_tokens, log_pi, M, top_k, domain_names(valid), T, C)
    docs = result.routed_documents
    assert docs.index.tolist() == [r["doc"] for r in brute["docs"]]
    np.testing.assert_allclose(docs["mixture"], [r["mixture"] for r in brute["docs"]],
                               rtol=1e-6, atol=2e-3)
    np.testing.assert_allclose(docs["routed"], [r["routed"] for r in brute["docs"]],
                               rtol=1e-6, atol=2e-3)
    chosen = docs[[f"choice_{j + 1}" for j in range(top_k)]].to_numpy()
    assert chosen.tolist() == [r["chosen"] for r in brute["docs"]]
    assert docs["winner"].tolist() == [r["winner"] for r in brute["docs"]]
    for name in ("overall", *valid.domains):
        expected = brute_table(brute["docs"], None if name == "overall" else name)
        got = result.routing.loc[name]
        for column, value in expected.items():
            assert got[column] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, column)
    s = result.summary
    lengths = [valid.document_length(i) for i in range(len(valid))]
    assert s["short_documents"] == sum(n <= M for n in lengths) == len(valid) - len(docs)
    assert s["forwards_per_token_full"] == pytest.approx(brute["cost_full"] / brute["tokens"])
    assert s["forwards_per_token_routed"] == pytest.approx(brute["cost_routed"] / brute["tokens"])
    assert s["routing_accuracy"] == pytest.approx(brute_table(brute["docs"])["accuracy"])
    if M == 2:  # the top-1 choice misses the winner, the second choice catches it
        assert s["routing_accuracy"] < s["winner_in_chosen"]
    if top_k == 3:  # every expert kept: the routed number is the full mixture's
        np.testing.assert_allclose(docs["routed"], docs["mixture"], rtol=1e-7, atol=1e-6)
    if M == 340:
        assert s["short_documents"] > 0
        assert any("left out of the routed figures" in n for n in result.notes)


def test_routing_differs_from_the_full_mixture_here(model, valid, trained_tokens):
    """The brute-force comparison above means something: routed and full numbers differ, and
    the prefix choice is not always the winner at a short prefix."""
    brute = brute_routing(trained_tokens, np.full(3, -math.log(3)), 2, 1,
                          domain_names(valid), T, C)
    table = brute_table(brute["docs"])
    assert abs(table["gap"]) > 1e-4
    assert table["accuracy"] < 1


def test_the_routed_pass_runs_only_the_chosen_experts_after_the_prefix(valid, monkeypatch):
    """A document of 40 tokens, T = 16, C = 0, M = 5, K' = 1 of K = 3: the prefix costs 3 * 5
    positions, the rest one expert over its windows [0, 16), [16, 32), [32, 40): 15 + 40 = 55
    forwards against 3 * 40 = 120 in full; the model is really called that often."""
    model = gated_model(valid, max_seq_len=16)
    one = valid.document(0)[:40]
    calls = []
    original = MixtureLM.token_log_probs

    def counting(self, tokens, lengths, experts):
        calls.append((int(lengths.sum()), experts.tolist()))
        return original(self, tokens, lengths, experts)

    from moelab.eval.routing import routed_scores

    monkeypatch.setattr(MixtureLM, "token_log_probs", counting)
    scores = routed_scores(model, [40], lambda d, s, e: one[s:e], np.zeros(3),
                           Routing(prefix=5, top_k=1), tokens_per_sample=16, context_window=0,
                           max_sentences=8, pad_id=valid.pad_id)
    assert scores.forwards == 55 == sum(n for n, _ in calls)
    prefix_call, rest_call = calls
    assert prefix_call == (15, [0, 1, 2])
    chosen = int(scores.chosen[0, 0])
    assert rest_call == (40, [chosen] * 3)  # three windows, one expert each


def test_routing_by_the_prior_alone_with_a_uniform_prior_is_noted(model, valid):
    result = evaluate(model, valid, tokens_per_sample=T, context_window=C, routing="topk:2",
                      progress=False)
    assert result.summary["short_documents"] == 0
    assert result.routed_documents["choice_1"].eq(0).all()  # ties: the lower index first
    assert any("every expert ties" in n for n in result.notes)


# ----------------------------------------------------------------------------- priors


def brute_cached_prior(model: MixtureLM, tokens: list[np.ndarray]) -> np.ndarray:
    log_pi = brute_start_prior(model)
    posteriors = []
    for tok in tokens:
        joint = log_pi + tok.sum(0)
        posteriors.append(np.exp(joint - lse(joint)))
    return np.log(np.mean(posteriors, axis=0))


@pytest.fixture(scope="module")
def gated(valid):
    return gated_model(valid)


@pytest.fixture(scope="module")
def gated_tokens(gated, valid, test_split):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {split.split: [brute_token_log_probs(gated, split.document(i), T, C)
                              for i in range(len(split))] for split in (valid, test_split)}
    finally:
        torch.set_num_threads(threads)


def test_the_cached_prior_is_the_mean_valid_posterior_used_on_test(gated, valid, test_split,
                                                                   gated_tokens):
    result = evaluate(gated, test_split, tokens_per_sample=T, context_window=C, prior="cached",
                      prior_dataset=valid, routing="prefix:12,topk:2", progress=False)
    cached = brute_cached_prior(gated, gated_tokens["valid"])
    assert np.ptp(cached) > 0.05 and np.abs(cached - brute_start_prior(gated)).max() > 0.05
    np.testing.assert_allclose(result.log_prior, cached, rtol=1e-5, atol=1e-5)
    tokens = gated_tokens["test"]
    mixture = [lse(cached + tok.sum(0)) for tok in tokens]
    n = sum(len(tok) for tok in tokens)
    assert result.perplexity.loc["overall", "mixture"] == pytest.approx(
        math.exp(-sum(mixture) / n), rel=1e-6)
    brute = brute_routing(tokens, cached, 12, 2, domain_names(test_split), T, C)
    for column, value in brute_table(brute["docs"]).items():
        assert result.routing.loc["overall", column] == pytest.approx(value, rel=1e-5, abs=1e-6)
    s = result.summary
    assert (s["prior"], s["prior_from"]) == ("cached", "mean document posterior on valid")
    assert not any("split it weighs" in n for n in result.notes)  # estimated on another split


def test_a_cached_prior_estimated_on_the_split_it_weighs_is_noted(gated, valid):
    result = evaluate(gated, valid, tokens_per_sample=T, prior="cached", prior_dataset=valid,
                      progress=False)
    assert any("estimated on the split it weighs (valid)" in n for n in result.notes)
    with pytest.raises(ValueError, match="--prior cached needs the valid split"):
        evaluate(gated, valid, tokens_per_sample=T, prior="cached", progress=False)


# ----------------------------------------------------------------------------- chunk latent


def brute_chunks(model: MixtureLM, ds: BinarizedDataset, tokens: list[np.ndarray],
                 log_prior: np.ndarray | None = None):
    """Per document: log p(doc) = sum over chunks of T tokens of logsumexp_z [log p(z | the T
    tokens before the chunk) + log p(chunk | z)], and its token-weighted chunk posterior."""
    mixtures, posteriors, chunk_posts = [], [], []
    for d, tok in enumerate(tokens):
        doc = torch.from_numpy(ds.document(d))
        total, weighted = 0.0, np.zeros(model.num_experts)
        for start in range(0, len(tok), T):
            context = doc[max(0, start - T) : start][None]  # (1, <= T)
            with torch.no_grad():
                prior = model.log_prior(context, torch.tensor([context.shape[1]]))[0]
            prior = prior.double().numpy() if log_prior is None else log_prior
            joint = prior + tok[start : start + T].sum(0)
            total += lse(joint)
            post = np.exp(joint - lse(joint))
            chunk_posts.append(post)
            weighted += post * len(tok[start : start + T])
        mixtures.append(total)
        posteriors.append(weighted / len(tok))
    return np.array(mixtures), np.array(posteriors), np.array(chunk_posts)


def test_the_chunk_latent_matches_brute_force_with_a_prior_read_from_each_context(
        gated, valid, gated_tokens):
    result = evaluate(gated, valid, tokens_per_sample=T, context_window=C, latent="chunk",
                      progress=False)
    mixture, posterior, chunk_posts = brute_chunks(gated, valid, gated_tokens["valid"])
    np.testing.assert_allclose(result.documents["mixture"], mixture, rtol=1e-6, atol=2e-3)
    n = sum(len(t) for t in gated_tokens["valid"])
    assert result.perplexity.loc["overall", "mixture"] == pytest.approx(
        math.exp(-mixture.sum() / n), rel=1e-6)
    np.testing.assert_allclose(result.posteriors.to_numpy(), posterior, atol=1e-5)
    # the context moves the prior: the start's prior for every chunk gives other numbers
    start = brute_start_prior(gated)
    at_start, start_posterior, _ = brute_chunks(gated, valid, gated_tokens["valid"], start)
    assert np.abs(start_posterior - posterior).max() > 0.05
    assert np.abs(at_start - mixture).max() > 0.01  # 5 times the tolerance above
    assert (result.summary["latent"], result.summary["prior_from"]) == (
        "chunk", "each chunk's context")
    # cached with the chunk latent: the mean chunk posterior on valid, for every chunk
    cached = evaluate(gated, valid, tokens_per_sample=T, context_window=C, latent="chunk",
                      prior="cached", prior_dataset=valid, progress=False)
    log_cached = np.log(chunk_posts.mean(0))
    np.testing.assert_allclose(cached.log_prior, log_cached, rtol=1e-5, atol=1e-5)
    expected, _, _ = brute_chunks(gated, valid, gated_tokens["valid"], log_prior=log_cached)
    np.testing.assert_allclose(cached.documents["mixture"], expected, rtol=1e-6, atol=2e-3)


def test_the_chunk_latent_at_context_zero_is_soft_em_validation_loss(gated, valid, one_thread):
    """What training optimises: with the training's windows (C = 0) the chunk latent's
    log-likelihood is the soft-EM validation loss, prior read from each chunk's context."""
    result = evaluate(gated, valid, tokens_per_sample=T, context_window=0, latent="chunk",
                      progress=False)
    batches = TrainBatches(valid, tokens_per_sample=T, max_tokens=256, shuffle=False)
    soft = validate(gated, batches, DistInfo(), Method.parse("sMoElp"))
    per_token = -result.documents["mixture"].sum() / result.documents["tokens"].sum()
    assert per_token == pytest.approx(soft.loss, rel=1e-6)


# ----------------------------------------------------------------------------- curves


def test_the_routing_curve_matches_brute_force_and_eval_lms_routed_figures(
        gated, valid, test_split, gated_tokens):
    curve = routing_curve(gated, test_split, prefixes=(3, 30), top_k=(1, 2), prior="cached",
                          prior_dataset=valid, tokens_per_sample=T, context_window=C,
                          progress=False)
    assert curve[["prefix", "top_k"]].values.tolist() == [[3, 1], [3, 2], [30, 1], [30, 2]]
    cached = brute_cached_prior(gated, gated_tokens["valid"])
    for _, row in curve.iterrows():
        brute = brute_routing(gated_tokens["test"], cached, int(row["prefix"]),
                              int(row["top_k"]), domain_names(test_split), T, C)
        for column, value in {**brute_table(brute["docs"]),
                              "forwards_per_doc_token_full": brute["cost_full"] / brute["tokens"],
                              "forwards_per_doc_token_routed":
                                  brute["cost_routed"] / brute["tokens"]}.items():
            assert row[column] == pytest.approx(value, rel=1e-5, abs=1e-6), column
    # the brute force's tokens: after the prefix for the perplexities, every token for the cost
    notes = " ".join(curve.attrs["notes"])
    assert "mixture, routed and gap: the tokens after the prefix" in notes
    assert "forwards_per_doc_token_full and _routed" in notes
    assert "per token of the routed documents, prefix included" in notes
    routed = evaluate(gated, test_split, tokens_per_sample=T, context_window=C, prior="cached",
                      prior_dataset=valid, routing="prefix:30,topk:2", progress=False)
    last = curve.iloc[-1]
    for column in ("mixture", "routed", "accuracy", "winner_in_chosen"):
        assert routed.routing.loc["overall", column] == pytest.approx(last[column], rel=1e-6)


def test_the_routing_figure_draws_the_curves_numbers():
    from moelab.report import routing_curves

    curve = pd.DataFrame({"prefix": [16, 16, 64, 64], "top_k": [1, 2, 1, 2],
                          "mixture": [30.0, 30.0, 29.0, 29.0], "routed": [33.0, 31.0, 29.5, 29.1],
                          "accuracy": [0.7, 0.7, 0.9, 0.9], "winner_in_chosen": [0.7, 0.85, 0.9, 1],
                          "forwards_per_doc_token_full": [3.0, 3.0, 3.0, 3.0],
                          "forwards_per_doc_token_routed": [1.1, 2.1, 1.4, 2.3]})
    ppl, acc, cost = routing_curves(curve).axes
    lines = {ax: {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                  for line in ax.get_lines()} for ax in (ppl, acc, cost)}
    assert lines[ppl] == {"full mixture": ([16, 64], [30.0, 29.0]),
                          "routed, K'=1": ([16, 64], [33.0, 29.5]),
                          "routed, K'=2": ([16, 64], [31.0, 29.1])}
    assert lines[acc] == {"top-1 choice = winner": ([16, 64], [0.7, 0.9]),
                          "winner among the 2 chosen": ([16, 64], [0.85, 1.0])}
    assert lines[cost] == {"full scoring": ([16, 64], [3.0, 3.0]),
                           "routed, K'=1": ([16, 64], [1.1, 1.4]),
                           "routed, K'=2": ([16, 64], [2.1, 2.3])}


def test_each_routed_figure_says_which_tokens_it_counts(model, valid):
    """Perplexities over the tokens after the prefix, cost over every token a pass reads: the
    numbers are over the sets the table, its note and eval-lm's lines name (the routing curve's
    columns and notes: test_the_routing_curve_matches_brute_force...)."""
    M = 30
    result = evaluate(model, valid, tokens_per_sample=T, context_window=C, routing=f"prefix:{M}",
                      progress=False)
    lengths = np.array([valid.document_length(i) for i in range(len(valid))])
    routed = lengths[lengths > M]
    s = result.summary
    assert result.routing.loc["overall", "tokens"] == (routed - M).sum()
    assert any("tokens after the prefix" in n for n in result.routing.attrs["notes"])
    assert s["tokens_per_second_routed"] * s["seconds_routed"] == pytest.approx(routed.sum())
    assert s["tokens_per_second_full"] * s["seconds_full"] == pytest.approx(lengths.sum())
    text = describe_routing(result)
    assert "tokens after prefix" in text and "perplexity on the tokens after the prefix" in text
    assert "per token read (every token of the routed documents, prefix included" in text
    assert "tokens/s in full (every token of the split)" in text


# ----------------------------------------------------------------------------- reports, cache


def test_eval_lm_names_its_prior_latent_and_routing_in_print_and_json(tiny_bin, ckpt, tmp_path,
                                                                      capsys):
    results = tmp_path / "results"
    assert main(["eval-lm", str(tiny_bin), "--path", str(ckpt), "--gen-subset", "test",
                 "--routing", "prefix:16,topk:2", "--prior", "cached", "--no-progress-bar",
                 "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "--latent document (one expert per document), --prior cached (read from mean " \
           "document posterior on valid), --routing prefix:16,topk:2" in out
    assert "routing accuracy" in out and "expert forwards per token" in out
    data = json.loads((results / "test_eval.json").read_text())
    assert (data["summary"]["prior"], data["summary"]["latent"], data["summary"]["routing"]) \
        == ("cached", "document", "prefix:16,topk:2")
    assert data["settings"]["routing"] == "prefix:16,topk:2"
    assert set(data["routing"]) == {"overall", "alpha", "beta", "gamma"}
    assert (results / "test_routing.csv").is_file()
    assert (results / "test_routed_documents.csv").is_file()


def test_a_routed_result_is_cached_apart_and_reads_back_as_routed(ckpt, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(ckpt, folder / "checkpoint_best.pt")
    run = Run.load(folder)
    full = evaluate_run(run, "valid", progress=False)
    routed = evaluate_run(run, "valid", routing="prefix:8", prior="cached", progress=False)
    assert sorted(p.name for p in folder.glob("eval_*.npz")) == [
        "eval_valid_c0.npz", "eval_valid_c0_rprefix8_pcached.npz"]
    again = evaluate_run(Run.load(folder), "valid", routing="prefix:8", prior="cached",
                                      progress=False)
    assert again.routing is not None and full.routing is None
    assert evaluate_run(Run.load(folder), "valid", progress=False).routing is None
    for name in ("routing", "prior", "latent", "prior_from", "routing_accuracy",
                 "forwards_per_token_routed", "tokens_per_second_routed"):
        assert again.summary[name] == routed.summary[name], name
    np.testing.assert_allclose(again.routing.to_numpy(float), routed.routing.to_numpy(float))
    assert again.notes == routed.notes
    assert format_result(again) == format_result(routed)
    chunk = evaluate_run(Run.load(folder), "valid", latent="chunk", progress=False)
    reread = evaluate_run(Run.load(folder), "valid", latent="chunk", progress=False)
    assert (folder / "eval_valid_c0_lchunk.npz").is_file()
    np.testing.assert_allclose(reread.documents["mixture"], chunk.documents["mixture"])
    assert reread.summary["latent"] == "chunk"
