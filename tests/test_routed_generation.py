"""Routed generation (`expert="topk:K'"`, `--gen-expert topk:K'`): the next-token distribution is
the posterior-weighted mixture of the chosen experts, checked against explicit per-expert forward
passes; the weights follow Bayes as tokens are generated."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch

from moelab.cli import main
from moelab.data import BinarizedDataset, Tokenizer
from moelab.eval.windows import window_log_likelihoods
from moelab.generate import (
    GenerationConfig,
    expert_posterior,
    generate,
    mixture_tokens,
    route,
)
from moelab.model import MixtureLM, ModelConfig

PROMPT = "the of and"


@pytest.fixture(scope="module")
def tokenizer(tiny_bin) -> Tokenizer:
    return BinarizedDataset(tiny_bin, "valid").tokenizer()


@pytest.fixture(scope="module")
def distinct() -> MixtureLM:
    """K = 3 with a learned prior (a non-uniform start prior) and expert tokens scaled up, so
    the experts' next-token distributions and the posterior differ by a lot, not by noise."""
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(vocab_size=512, num_experts=3, n_layer=2, n_embd=32, n_head=4,
                                  ffn_dim=64, max_seq_len=24, dropout=0.0, pad_id=3, gating=True,
                                  gating_dim=16)).eval()
    with torch.no_grad():
        model.transformer.tok_emb.weight[512:] *= 8.0
        model.gating.fc2.bias.copy_(torch.tensor([0.8, -0.5, 0.1]))
    return model


def by_hand(model: MixtureLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_z + log p_z(ids), log p_z(next | ids)) for every expert z, float64 (K,), (K, V):
    one explicit forward of [<expert_z>] + ids per expert."""
    K, V = model.num_experts, model.config.vocab_size
    log_pi = model.log_prior(torch.zeros(1, 0, dtype=torch.long),
                             torch.zeros(1, dtype=torch.long))[0].double()
    joint, following = [], []
    with torch.no_grad():
        for z in range(K):
            logits = model(torch.tensor([[V + z, *ids]]))[0]  # (n + 1, V)
            logp = torch.log_softmax(logits.double(), dim=-1)
            joint.append(log_pi[z] + sum(logp[t, x] for t, x in enumerate(ids)))
            following.append(logp[-1])
    return torch.stack(joint), torch.stack(following)


def test_the_gating_prior_is_not_uniform(distinct):
    """What the tests below lean on: the start prior and the posterior are far from flat."""
    prior = distinct.start_log_prior().exp()
    assert float(prior.max() - prior.min()) > 0.2


def test_topk_next_token_distribution_is_the_posterior_weighted_mixture(distinct, tokenizer):
    ids = tokenizer.encode(PROMPT)
    joint, following = by_hand(distinct, ids)
    posterior = torch.softmax(joint, 0)
    chosen = [int(k) for k in posterior.argsort(descending=True)[:2]]
    assert float(posterior[chosen[0]] / posterior[chosen[1]]) > 1.2  # the weights are unequal
    w = posterior[chosen] / posterior[chosen].sum()
    expected = torch.logsumexp(w.log()[:, None] + following[chosen], dim=0)  # (V,)

    mixture = route(distinct, tokenizer, PROMPT, 2)
    assert mixture.experts == chosen
    torch.testing.assert_close(mixture.weights, w, atol=1e-6, rtol=0)
    got = mixture.next_log_probs().double()
    real = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), real)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)  # log-probs


def test_topk_of_all_experts_is_the_full_mixtures_predictive_distribution(distinct, tokenizer):
    """p(x | prompt) = p_mix(prompt + x) / p_mix(prompt), the document mixture of evaluation
    (log pi + sliding-window log p(doc | z)) for every next token x of the vocabulary."""
    ids = tokenizer.encode(PROMPT)
    V = distinct.config.vocab_size
    docs = [ids, *([*ids, x] for x in range(V))]
    ll = window_log_likelihoods(
        distinct, len(docs), [len(d) for d in docs],
        lambda d, s, e: np.asarray(docs[d][s:e], dtype=np.int64),
        tokens_per_sample=distinct.config.max_seq_len, context_window=0, max_sentences=64,
        pad_id=3)  # (1 + V, K)
    log_mix = torch.logsumexp(ll + distinct.start_log_prior()[None, :], dim=1)  # (1 + V,)
    expected = log_mix[1:] - log_mix[0]  # (V,)

    got = route(distinct, tokenizer, PROMPT, distinct.num_experts).next_log_probs().double()
    real = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), real) and real.sum() > V - 10
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=0)
    assert float(got[real].exp().sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_weights_follow_the_posterior_given_the_prompt_and_each_generated_token(
        distinct, tokenizer, use_cache):
    ids = tokenizer.encode(PROMPT)
    mixture = route(distinct, tokenizer, PROMPT, 2, use_cache=use_cache)
    config = GenerationConfig(max_new_tokens=6, min_len=6, sampling=True, seed=5,
                              use_cache=use_cache)
    new = list(mixture_tokens(mixture, config=config))
    assert len(new) == 6 and len(ids) + len(new) < distinct.config.max_seq_len
    # w_z ∝ pi_z p_z(prompt + new) over the chosen experts, and the next token is mixed by it
    joint, following = by_hand(distinct, [*ids, *new])
    chosen = mixture.experts
    w = torch.softmax(joint[chosen], 0)
    torch.testing.assert_close(mixture.weights, w, atol=1e-5, rtol=0)
    assert float((mixture.weights - route(distinct, tokenizer, PROMPT, 2).weights).abs().max()
                 ) > 1e-3  # the tokens moved the weights
    expected = torch.logsumexp(w.log()[:, None] + following[chosen], dim=0)
    got = mixture.next_log_probs().double()
    real = torch.isfinite(expected)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)  # log-probs


def test_one_update_is_bayes_rule(distinct, tokenizer):
    mixture = route(distinct, tokenizer, PROMPT, 3)
    before = mixture.weights.clone()
    _, following = by_hand(distinct, tokenizer.encode(PROMPT))
    token = 17
    mixture.append(token)
    expected = before * following[mixture.experts, token].exp()  # in the mixture's order
    torch.testing.assert_close(mixture.weights, expected / expected.sum(), atol=1e-6, rtol=0)


def test_topk_one_is_the_auto_expert_alone(distinct, tokenizer):
    joint, following = by_hand(distinct, tokenizer.encode(PROMPT))
    best = int(joint.argmax())
    assert best == int(expert_posterior(distinct, tokenizer, PROMPT).argmax())
    mixture = route(distinct, tokenizer, PROMPT, 1)
    assert mixture.experts == [best] and float(mixture.weights[0]) == 1.0
    expected = following[best]
    got = mixture.next_log_probs().double()
    real = torch.isfinite(expected)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    config = GenerationConfig(max_new_tokens=12)  # greedy: the same argmax, the same text
    assert generate(distinct, tokenizer, PROMPT, expert="topk:1", config=config) == generate(
        distinct, tokenizer, PROMPT, expert="auto", config=config)


def test_topk_sampling_repeats_with_its_seed_with_or_without_the_kv_cache(distinct,
                                                                          tokenizer):
    texts = [generate(distinct, tokenizer, PROMPT, expert="topk:2",
                      config=GenerationConfig(max_new_tokens=40, min_len=40, sampling=True,
                                              seed=2, use_cache=c)) for c in (True, True, False)]
    assert texts[0] == texts[1] == texts[2] and texts[0]


def test_bad_topk_values_and_beam_search_are_refused(distinct, tokenizer):
    for bad in ("topk:0", "topk:4", "topk:x", "topk:"):
        with pytest.raises(ValueError, match="from 1 to K=3"):
            generate(distinct, tokenizer, "x", expert=bad)
    with pytest.raises(ValueError, match="beam search follows one expert"):
        generate(distinct, tokenizer, "x", expert="topk:2", config=GenerationConfig(beam=2))


# ----------------------------------------------------------------------------- interactive


def run_cli(argv, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_interactive_topk_names_the_mixed_experts_and_samples_the_mixture(tiny_bin, ckpt,
                                                                          monkeypatch, capsys):
    from moelab.train import Run

    run = Run.load(ckpt, data_bin=tiny_bin)
    prompt = "the of and"
    base = ["interactive", str(tiny_bin), "--path", str(ckpt), "--max-len-b", "10",
            "--prompt", prompt, "--sampling", "--seed", "4"]
    rc, out, _ = run_cli([*base, "--gen-expert", "topk:2"], monkeypatch, capsys)
    assert rc == 0
    posterior = expert_posterior(run.model, run.tokenizer, prompt)
    best = [int(k) for k in posterior.argsort(descending=True)[:2]]
    label = re.match(r"\[mixture of experts (\d+) \(([\d.]+)\), (\d+) \(([\d.]+)\)", out)
    assert label, out
    assert [int(label[1]), int(label[3])] == best
    assert label[2] == f"{float(posterior[best[0]]):.3f}"
    text = generate(run.model, run.tokenizer, prompt, expert="topk:2",
                    config=GenerationConfig(max_new_tokens=10, sampling=True, seed=4))
    assert out.rstrip("\n").endswith(f"{prompt}{text}")


@pytest.mark.parametrize("flags, message", [
    (["--gen-expert", "topk:4"], "from 1 to K=3"),
    (["--gen-expert", "topk:two"], "from 1 to K=3"),
    (["--gen-expert", "topk:2", "--beam", "3"], "beam search follows one expert"),
])
def test_interactive_bad_topk_is_one_clear_line(tiny_bin, ckpt, monkeypatch, capsys, flags,
                                                message):
    rc, _, err = run_cli(["interactive", str(tiny_bin), "--path", str(ckpt), "--prompt", "x",
                          *flags], monkeypatch, capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_log_weights_stay_normalised_over_long_generation(distinct, tokenizer):
    mixture = route(distinct, tokenizer, PROMPT, 3)
    list(mixture_tokens(mixture, config=GenerationConfig(max_new_tokens=60, min_len=60,
                                                          sampling=True, seed=1)))
    assert math.isclose(float(mixture.weights.sum()), 1.0, abs_tol=1e-9)
