"""moelab.generate and `moelab interactive`: KV cache, top-p, seeds, beam search, bad input, CLI."""

from __future__ import annotations

import io
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.cli import main
from moelab.data import BinarizedDataset, Tokenizer
from moelab.data.tokenizer import EOS_ID
from moelab.generate import (
    GenerationConfig,
    PromptTruncatedWarning,
    _new_tokens,
    beam_search,
    expert_posterior,
    generate,
    sample_next,
    stream,
)
from moelab.model import MixtureLM, ModelConfig

T = 64


@pytest.fixture(scope="session")
def tokenizer(tiny_bin) -> Tokenizer:
    return BinarizedDataset(tiny_bin, "valid").tokenizer()


def small_model(vocab_size: int = 512, **overrides) -> MixtureLM:
    torch.manual_seed(0)
    base = dict(vocab_size=vocab_size, num_experts=3, n_layer=2, n_embd=32, n_head=4,
                ffn_dim=64, max_seq_len=16, dropout=0.0, pad_id=3)
    return MixtureLM(ModelConfig(**{**base, **overrides})).eval()


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("steps", [[5, 1, 1, 1, 1], [1] * 9, [3, 4, 2], [2, 1, 5, 1]])
def test_logits_with_kv_cache_equal_full_forward(steps):
    model = small_model(vocab_size=50)
    g = torch.Generator().manual_seed(0)
    inputs = torch.cat([torch.tensor([[50], [52]]), torch.randint(4, 50, (2, 8), generator=g)],
                       dim=1)  # (2, 9): <expert_0>, <expert_2> then tokens
    with torch.no_grad():
        full = model(inputs)  # (2, 9, V+K)
        cache, pieces, at = model.new_cache(), [], 0
        for n in steps:  # prefill, then decode one or several tokens at a time
            pieces.append(model(inputs[:, at : at + n], cache))
            at += n
        assert len(cache) == inputs.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_next_token_logits_are_the_last_position_of_the_full_forward():
    model = small_model(vocab_size=50)
    inputs = torch.cat([torch.tensor([[51]]), torch.randint(4, 50, (1, 7))], dim=1)
    with torch.no_grad():
        full = model(inputs)[:, -1]
        cache = model.new_cache()
        model.next_token_logits(inputs[:, :5], cache)
        cached = model.next_token_logits(inputs[:, 5:], cache)
        torch.testing.assert_close(model.next_token_logits(inputs), full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_to_grow_past_the_context():
    model = small_model(vocab_size=50)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.full((1, 16), 7), cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.full((1, 1), 7), cache)


def test_generation_with_and_without_cache_agrees_across_the_sliding_window(tokenizer):
    model = small_model()  # max_seq_len 16: 30 new tokens slide the window several times
    texts = [generate(model, tokenizer, "abc", expert=1,
                      config=GenerationConfig(max_new_tokens=30, min_len=30, use_cache=c))
             for c in (True, False)]
    assert texts[0] == texts[1] and texts[0]
    sampled = [generate(model, tokenizer, "abc", expert=2,
                        config=GenerationConfig(max_new_tokens=30, min_len=30, sampling=True,
                                                top_p=0.9, seed=3, use_cache=c))
               for c in (True, False)]
    assert sampled[0] == sampled[1]


# ----------------------------------------------------------------------------- sampling


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 60),
       top_p=st.floats(0.01, 1.0), temperature=st.floats(0.2, 3.0),
       scale=st.floats(0.1, 10.0))
def test_top_p_never_samples_outside_the_nucleus(seed, V, top_p, temperature, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * scale
    logits[0, : V // 2] = -float("inf")  # some tokens can never be drawn
    tokens = sample_next(logits, temperature=temperature, top_p=top_p, generator=g)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    for row, token in enumerate(tokens.tolist()):
        p = probs[row]
        # the token must be needed to reach top_p: the tokens strictly more probable than it
        # hold less than top_p of the mass (ties all count as members)
        ahead = float(p[p > p[token]].sum())
        assert p[token] > 0
        assert ahead < top_p + 1e-5


def test_top_p_one_and_greedy_edge_cases():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits, top_p=1e-6).tolist() == [1, 0]  # the nucleus is the argmax
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(500, 2, 3), top_p=1.0, generator=g)
    assert draws.shape == (500, 2) and set(draws[:, 0].tolist()) == {0, 1, 2}


def test_fixed_seed_gives_the_same_text_twice(model, tokenizer):
    config = GenerationConfig(max_new_tokens=30, sampling=True, top_p=0.9, seed=7)
    a = generate(model, tokenizer, "the", expert=0, config=config)
    b = generate(model, tokenizer, "the", expert=0, config=config)
    c = generate(model, tokenizer, "the", expert=0,
                 config=GenerationConfig(max_new_tokens=30, sampling=True, top_p=0.9, seed=8))
    assert a == b and a != c


def test_stream_pieces_concatenate_to_the_generated_text(tokenizer):
    # an untrained model emits byte-fallback pieces: characters that span several tokens
    model = small_model(max_seq_len=32)
    held_back = 0
    for seed in range(4):
        config = GenerationConfig(max_new_tokens=60, sampling=True, temperature=2.0, seed=seed)
        pieces = list(stream(model, tokenizer, "", expert=seed % 3, config=config))
        assert all(pieces) and not any(p.endswith("\ufffd") for p in pieces[:-1])
        ids = list(_new_tokens(model, [], expert=seed % 3, config=config,
                               generator=torch.Generator().manual_seed(seed)))
        assert "".join(pieces) == tokenizer.decode(ids)
        assert "".join(pieces) == generate(model, tokenizer, "", expert=seed % 3, config=config)
        held_back += sum(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))
    assert held_back > 0  # the test really met characters split over several tokens


def test_beam_search_with_beam_one_equals_greedy(model, tokenizer):
    for prompt, expert in [("the", 0), ("", 1), ("ab cd", 2)]:
        greedy = generate(model, tokenizer, prompt, expert=expert,
                          config=GenerationConfig(max_new_tokens=25))
        beam = beam_search(model, tokenizer, prompt, expert=expert,
                           config=GenerationConfig(max_new_tokens=25, beam=1))
        assert beam == greedy


def test_beam_search_wider_beams(model, tokenizer):
    config = GenerationConfig(max_new_tokens=20, beam=4)
    text = generate(model, tokenizer, "the", expert=0, config=config)  # dispatches to beams
    assert text == beam_search(model, tokenizer, "the", expert=0, config=config)
    assert beam_search(model, tokenizer, "the", expert=0,
                       config=GenerationConfig(max_new_tokens=20, beam=4, use_cache=False)) == text


def test_expert_posterior_is_prior_times_likelihood(model, tokenizer):
    prompt = "the of and"
    posterior = expert_posterior(model, tokenizer, prompt)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        ll = model.expert_log_likelihoods(ids, torch.tensor([ids.shape[1]]))[0]
    torch.testing.assert_close(posterior, torch.softmax(ll.double() - torch.log(torch.tensor(3.0)),
                                                        0), atol=1e-6, rtol=1e-6)
    assert torch.allclose(expert_posterior(model, tokenizer, ""), torch.full((3,), 1 / 3,
                                                                             dtype=torch.float64))
    # "auto" continues with the expert of highest posterior
    config = GenerationConfig(max_new_tokens=10)
    best = int(posterior.argmax())
    assert generate(model, tokenizer, prompt, expert="auto", config=config) == generate(
        model, tokenizer, prompt, expert=best, config=config)


# ----------------------------------------------------------------------------- bad input


def test_expert_out_of_range_lists_the_valid_choices(model, tokenizer):
    with pytest.raises(ValueError, match=r"K=3 experts; choose one of 0, 1, 2") as info:
        generate(model, tokenizer, "x", expert=3)
    # every choice the message offers is one generate() takes
    offered = re.split(r", | or ", str(info.value).split("choose one of ")[1])
    short = GenerationConfig(max_new_tokens=2)
    for choice in offered:
        expert = int(choice) if choice.isdigit() else choice.replace("K'", "2")
        generate(model, tokenizer, "x", expert=expert, config=short)
    with pytest.raises(ValueError, match="choose one of"):
        beam_search(model, tokenizer, "x", expert=-1)
    with pytest.raises(ValueError, match="choose one of"):
        generate(model, tokenizer, "x", expert="first")
    assert generate(model, tokenizer, "x", expert=torch.tensor(2),
                    config=GenerationConfig(max_new_tokens=3)) == generate(
        model, tokenizer, "x", expert=2, config=GenerationConfig(max_new_tokens=3))


def test_empty_prompt_samples_from_the_expert_token_alone(model, tokenizer):
    config = GenerationConfig(max_new_tokens=20, min_len=5, sampling=True, seed=1)
    text = generate(model, tokenizer, "", expert=2, config=config)
    assert text
    assert generate(model, tokenizer, "", expert=2, config=config) == text


def test_prompt_longer_than_the_context_keeps_its_end(model, tokenizer):
    prompt = " ".join(f"w{i}" for i in range(200))
    assert len(tokenizer.encode(prompt)) > T
    config = GenerationConfig(max_new_tokens=5)
    with pytest.warns(PromptTruncatedWarning, match=f"keeping its last {T - 1} tokens"):
        text = generate(model, tokenizer, prompt, expert=0, config=config)
    kept = tokenizer.decode(tokenizer.encode(prompt)[-(T - 1) :])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kept end fits: no warning
        assert generate(model, tokenizer, kept, expert=0, config=config) == text


def test_generation_config_validation():
    assert GenerationConfig(top_p=-1).top_p == 1.0  # fairseq's "off"
    for bad in (dict(top_p=0.0), dict(temperature=0.0), dict(beam=0),
                dict(beam=3, sampling=True), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


def test_stops_at_eos_without_emitting_it(model, tokenizer):
    # (never emitting a special or expert token: see ..._even_when_the_model_prefers_them)
    logits = torch.zeros(1, model.config.vocab_size)  # the model's output distribution
    logits[0, EOS_ID] = 100.0  # a model that always ends at once

    class EndsAtOnce(torch.nn.Module):
        config = model.config
        num_experts = model.num_experts

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def next_token_logits(self, input_ids, cache=None):
            calls.append(1)
            return logits.expand(input_ids.shape[0], -1)

        def new_cache(self):
            return model.new_cache()

    calls = []
    assert generate(EndsAtOnce(), tokenizer, "x", config=GenerationConfig()) == ""
    assert len(calls) == 1  # eos came first: one step, nothing generated after it
    assert beam_search(EndsAtOnce(), tokenizer, "x", config=GenerationConfig(beam=2)) == ""


# ----------------------------------------------------------------------------- command line

SEED_INTERACTIVE = """fairseq-interactive data-bin/mix \
    --path checkpoints/checkpoint_best.pt \
    --beam 1 --sampling --sampling-topp 0.9 --remove-bpe \
    --task language_model_moe --user-dir examples/language_model_moe/src \
    --method hMoEup --mean-pool-gating-network \
    --mean-pool-gating-network-encoder-dim 512 \
    --mean-pool-gating-network-dropout 0.0 \
    --num-experts 10 \
    --gen-expert 0"""


def seed_argv(data: Path, ckpt: Path, *extra: str) -> list[str]:
    """The original fairseq workflow's command, `fairseq-X` -> `moelab X`, K shrunk to the tiny
    model's."""
    argv = shlex.split(SEED_INTERACTIVE)
    assert argv[0] == "fairseq-interactive"
    values = {"data-bin/mix": str(data), "checkpoints/checkpoint_best.pt": str(ckpt), "10": "3"}
    return ["interactive", *[values.get(a, a) for a in argv[1:]], *extra]


def run_cli(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_seed_interactive_command_reads_prompts_from_stdin(tiny_bin, ckpt, monkeypatch, capsys):
    argv = seed_argv(tiny_bin, ckpt, "--max-len-b", "12")
    rc, out, err = run_cli(argv, "the\n\nab cd\n", monkeypatch, capsys)
    assert rc == 0
    answers = [line for line in out.splitlines() if line.startswith("[expert 0]")]
    assert len(answers) == 3
    assert answers[0].startswith("[expert 0] the") and answers[2].startswith("[expert 0] ab cd")
    assert "--user-dir" in err and "uniform prior" in err  # fairseq flags explained
    # the same --seed gives the same text
    assert run_cli(argv, "the\n\nab cd\n", monkeypatch, capsys)[1] == out


def test_interactive_all_auto_beam_and_prompt_flags(tiny_bin, ckpt, monkeypatch, capsys):
    base = ["interactive", str(tiny_bin), "--path", str(ckpt), "--max-len-b", "8"]
    rc, out, _ = run_cli([*base, "--gen-expert", "all", "--sampling"], "the\n", monkeypatch,
                         capsys)
    assert rc == 0 and [line[:10] for line in out.splitlines() if line.startswith("[expert")] \
        == ["[expert 0]", "[expert 1]", "[expert 2]"]
    rc, out, _ = run_cli([*base, "--gen-expert", "auto", "--prompt", "the of"], "", monkeypatch,
                         capsys)
    assert rc == 0 and "posterior" in out.splitlines()[0]
    rc, out, _ = run_cli([*base, "--beam", "3", "--prompt", "the"], "", monkeypatch, capsys)
    assert rc == 0 and out.startswith("[expert 0] the")


def test_interactive_bad_input(tiny_bin, ckpt, monkeypatch, capsys):
    base = ["interactive", str(tiny_bin), "--path", str(ckpt)]
    rc, _, err = run_cli([*base, "--gen-expert", "3"], "x\n", monkeypatch, capsys)
    assert rc == 2 and "choose one of 0, 1, 2, all, auto or topk:K'" in err
    rc, _, err = run_cli([*base, "--num-experts", "10"], "x\n", monkeypatch, capsys)
    assert rc == 2 and "K=3" in err
    rc, _, err = run_cli([*base, "--beam", "2", "--sampling"], "x\n", monkeypatch, capsys)
    assert rc == 2 and "--beam 2 with --sampling" in err
    long_prompt = " ".join(f"w{i}" for i in range(200))
    rc, out, err = run_cli([*base, "--max-len-b", "3"], long_prompt + "\n", monkeypatch, capsys)
    assert rc == 0 and f"keeping its last {T - 1} tokens" in err
    assert out.startswith("[expert 0] ") and "w199" in out and "w0 " not in out


# ----------------------------------------------------------------------------- references


class IdTokenizer:
    """Text is the token ids, written `<id>`: decoded output shows exactly the ids generated."""

    def encode(self, text: str) -> list[int]:
        return [int(x) for x in re.findall(r"<(\d+)>", text)]

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)


def last_log_probs(model: MixtureLM, inputs: list[list[int]]) -> torch.Tensor:
    """log p(next token) (B, V), float64, from the hidden state of each row's last position."""
    with torch.no_grad():
        hidden = model.transformer.hidden(torch.tensor(inputs))[:, -1]  # (B, C)
        return F.log_softmax(model.output_logits(hidden).double(), dim=-1)


def prompt_log_likelihoods(model: MixtureLM, ids: list[int]) -> torch.Tensor:
    """log p(prompt | z) (K,), token by token: [<expert_z>] + the tokens before it."""
    V, K = model.config.vocab_size, model.num_experts
    total = torch.zeros(K, dtype=torch.float64)
    for t, token in enumerate(ids):
        total += last_log_probs(model, [[V + k, *ids[:t]] for k in range(K)])[:, token]
    return total


def empty_context_prior(model: MixtureLM) -> torch.Tensor:
    """log p(z | empty context) (K,) by hand: the empty context pools to the zero vector."""
    g = model.gating
    h = torch.tanh(g.fc1.bias.detach().double())  # fc1(0) = its bias
    return F.log_softmax(g.fc2.weight.detach().double() @ h + g.fc2.bias.detach().double(), 0)


# ----------------------------------------------------------------------------- dropout


def test_generation_runs_without_dropout(tokenizer):
    model = small_model(dropout=0.5, attention_dropout=0.5, gating=True, gating_dim=32,
                        gating_dropout=0.5)
    with torch.no_grad():
        model.gating.fc1.bias.normal_()  # the prior of `auto` passes through the dropout too
        model.gating.fc2.weight.normal_()
    model.train()
    x = torch.tensor([[513, 40, 50, 60, 70]])
    with torch.no_grad():  # dropout really changes this model's logits in train mode
        assert not torch.equal(model.next_token_logits(x), model.next_token_logits(x))
    configs = [
        (1, GenerationConfig(max_new_tokens=20, min_len=20)),  # greedy
        (2, GenerationConfig(max_new_tokens=20, min_len=20, sampling=True, top_p=0.9, seed=5)),
        (0, GenerationConfig(max_new_tokens=8, min_len=8, beam=3)),
        ("auto", GenerationConfig(max_new_tokens=12, min_len=12)),
    ]
    for expert, config in configs:
        model.train()
        in_train = generate(model, tokenizer, "the of", expert=expert, config=config)
        assert all(m.training for m in model.modules())  # the caller's mode is kept
        again = generate(model, tokenizer, "the of", expert=expert, config=config)
        model.eval()
        in_eval = generate(model, tokenizer, "the of", expert=expert, config=config)
        assert not any(m.training for m in model.modules())
        assert in_train == again == in_eval and in_eval, (expert, config)


# ----------------------------------------------------------------------------- auto


def test_auto_follows_the_posterior_under_a_learned_non_uniform_prior(tokenizer, monkeypatch):
    model = small_model(gating=True, gating_dim=32)
    V = model.config.vocab_size
    with torch.no_grad():
        model.transformer.tok_emb.weight[V:] = torch.randn(3, 32)  # experts that differ
        model.gating.fc1.bias.normal_()
        model.gating.fc2.weight.normal_()
    prompt = "the of and"
    ids = tokenizer.encode(prompt)
    ll = prompt_log_likelihoods(model, ids)  # (K,)
    by_likelihood = ll.argsort(descending=True).tolist()
    z_ll, z_prior = by_likelihood[0], by_likelihood[2]  # the likeliest and the least likely
    gap = float(ll[z_ll] - ll[z_prior])
    assert gap > 1e-3
    fed = []  # the expert token each generation starts from: the expert `auto` chose
    next_token_logits = model.next_token_logits

    def spy(input_ids, cache=None):
        if cache is None or len(cache) == 0:
            fed.append(int(input_ids[0, 0]))
        return next_token_logits(input_ids, cache)

    monkeypatch.setattr(model, "next_token_logits", spy)
    h = torch.tanh(model.gating.fc1.bias.detach())
    # the prior favours z_prior by `favour` nats over the others: strongly (it wins over the
    # likelihood), then mildly (the likelihood wins)
    for favour, winner in [(gap + 2.0, z_prior), (gap / 2, z_ll)]:
        logits = torch.zeros(3)
        logits[z_prior] = favour
        with torch.no_grad():
            model.gating.fc2.bias.copy_(logits - model.gating.fc2.weight @ h)
        prior = empty_context_prior(model)
        assert int(prior.argmax()) == z_prior
        assert float(prior[z_prior] - prior[z_ll]) == pytest.approx(favour, abs=1e-5)
        posterior = torch.softmax(prior + ll, dim=0)
        assert int(posterior.argmax()) == winner
        torch.testing.assert_close(expert_posterior(model, tokenizer, prompt), posterior,
                                   atol=1e-5, rtol=1e-5)
        fed.clear()
        generate(model, tokenizer, prompt, expert="auto", config=GenerationConfig(max_new_tokens=3))
        assert fed == [V + winner]


# ----------------------------------------------------------------------------- nucleus


@pytest.mark.parametrize("top_p, temperature, nucleus", [
    # sorted probabilities: 0.35 (id 1), 0.25 (id 3), 0.20 (id 4), 0.10 (id 2), 0.06 (id 5),
    # 0.04 (id 0); a token is in when the mass ahead of it is still below top_p
    (0.70, 1.0, [1, 3, 4]),  # 0.35 + 0.25 < 0.7: id 4 crosses 0.7 and is in, id 2 is not
    (0.55, 1.0, [1, 3]),  # 0.35 < 0.55 <= 0.6: id 3 crosses
    (0.30, 1.0, [1]),  # the most probable token alone already holds 0.3
    (0.92, 1.0, [1, 3, 4, 2, 5]),  # 0.9 < 0.92 <= 0.96: all but the least probable
    # temperature first, then the nucleus: p^2 normalized is 0.51, 0.26, 0.17, ...
    (0.70, 0.5, [1, 3]),
])
def test_top_p_samples_exactly_the_nucleus(top_p, temperature, nucleus):
    probs = torch.tensor([0.04, 0.35, 0.10, 0.25, 0.20, 0.06], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    draws = sample_next(probs.log().float().expand(n, -1), temperature=temperature, top_p=top_p,
                        generator=g)
    counts = torch.bincount(draws, minlength=6).double()
    assert sorted(torch.nonzero(counts).flatten().tolist()) == sorted(nucleus)  # both ways
    # inside the nucleus, the tempered probabilities renormalized
    tempered = probs ** (1 / temperature)
    expected = torch.zeros(6, dtype=torch.float64)
    expected[nucleus] = tempered[nucleus] / tempered[nucleus].sum()
    torch.testing.assert_close(counts / n, expected, atol=0.015, rtol=0)


# ----------------------------------------------------------------------------- beam search


def beam_model(seed: int = 3, std: float = 0.6) -> MixtureLM:
    """Vocabulary 8: unk 0, bos 1, eos 2, pad 3 and the 4 tokens 4..7; random, peaked weights."""
    torch.manual_seed(seed)
    model = MixtureLM(ModelConfig(vocab_size=8, num_experts=2, n_layer=1, n_embd=16, n_head=2,
                                  ffn_dim=32, max_seq_len=16, dropout=0.0, pad_id=3,
                                  share_input_output_embed=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def all_hypotheses(model: MixtureLM, prompt: list[int], expert: int, max_new: int):
    """Every continuation of n <= max_new tokens, ended by eos as fairseq ends them (eos forced
    after max_new tokens): (sum of log p with eos, n), by brute force."""
    V = model.config.vocab_size
    words = [i for i in range(V) if i not in model.config.non_target_ids and i != EOS_ID]
    out = {}

    def visit(seq: list[int], logp: float) -> None:
        step = last_log_probs(model, [[V + expert, *prompt, *seq]])[0]  # (V,)
        out[tuple(seq)] = (logp + float(step[EOS_ID]), len(seq))
        if len(seq) < max_new:
            for w in words:
                visit([*seq, w], logp + float(step[w]))

    visit([], 0.0)
    return out


@pytest.mark.parametrize("prompt, expert", [([4, 5], 1), ([], 0), ([6], 1)])
def test_beam_search_finds_the_best_length_normalized_hypothesis(prompt, expert):
    """fairseq's score: sum log p (eos included) / (new tokens + eos) ** lenpen, lenpen 1."""
    model = beam_model()
    max_new = 4
    hyps = all_hypotheses(model, prompt, expert, max_new)  # 1 + 4 + ... + 4^4 = 341
    assert len(hyps) == 341

    def best(score):
        ranked = sorted(hyps, key=lambda h: score(*hyps[h]), reverse=True)
        assert score(*hyps[ranked[0]]) > score(*hyps[ranked[1]]) + 1e-6  # no near tie
        return list(ranked[0])

    fairseq = best(lambda logp, n: logp / (n + 1))
    # a beam wide enough to keep every hypothesis: beam search is then exhaustive
    got = beam_search(model, IdTokenizer(), IdTokenizer().decode(prompt), expert=expert,
                      config=GenerationConfig(max_new_tokens=max_new, beam=400))
    assert IdTokenizer().encode(got) == fairseq
    if prompt == [4, 5]:  # the scores that must not be used pick other hypotheses here
        assert best(lambda logp, n: logp) != fairseq  # no normalization
        assert best(lambda logp, n: logp / max(n, 1)) != fairseq  # eos not counted


# ----------------------------------------------------------------------------- special tokens


def test_generation_never_emits_special_or_expert_tokens_even_when_the_model_prefers_them():
    model = small_model()
    V, K = model.config.vocab_size, model.num_experts
    banned = [0, 1, 3, *range(V, V + K)]  # unk, bos, pad and the expert tokens
    with torch.no_grad():
        u = torch.randn(32)
        u /= u.norm()
        model.transformer.ln_f.bias.copy_(10 * u)  # every hidden state leans along u ...
        weight = model.transformer.tok_emb.weight  # (V + K, C), tied to the output
        weight[banned] = 5 * u + 0.3 * torch.randn(len(banned), 32)  # ... and so do these rows
    tokenizer = IdTokenizer()
    prompt = "<10><20><30>"
    with torch.no_grad():  # as classes, the banned ids would win every step by tens of nats
        for expert in range(K):
            hidden = model.transformer.hidden(torch.tensor([[V + expert, 10, 20, 30]]))[0, -1]
            full = hidden @ model.transformer.lm_head.weight.t()  # (V + K,)
            top = full.topk(len(banned)).indices.tolist()
            assert sorted(top) == banned
            assert float(full[banned].min() - full[[i for i in range(V) if i not in banned]]
                         .max()) > 20
    emitted = []
    for expert in range(K):
        for config in (GenerationConfig(max_new_tokens=30, min_len=30),
                       GenerationConfig(max_new_tokens=8, min_len=8, beam=4),
                       *(GenerationConfig(max_new_tokens=30, min_len=30, sampling=True,
                                          temperature=2.0, seed=s) for s in range(3))):
            ids = tokenizer.encode(generate(model, tokenizer, prompt, expert=expert,
                                            config=config))
            assert len(ids) == config.max_new_tokens
            emitted += ids
    assert not set(emitted) & set(banned) and max(emitted) < V
    assert len(set(emitted)) > 20  # sampling really ranged over the vocabulary


# ----------------------------------------------------------------------------- trained experts


@pytest.fixture(scope="module")
def distinct_experts(tiny_bin, tmp_path_factory) -> MixtureLM:
    """hMoEup K=3 trained 100 updates on the 3 domains (~6 s on one thread). The session's
    20-update `model` has barely split: its experts' next-token KL averages ~0.03 nats."""
    from moelab.train import load_checkpoint, train

    save_dir = tmp_path_factory.mktemp("trained-100-updates")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(str(tiny_bin), arch="tiny", method="hMoEup", num_experts=3, max_update=100,
              tokens_per_sample=T, max_tokens=512, warmup_updates=10, lr=3e-3,
              decoder_embed_dim=64, decoder_ffn_embed_dim=128, dropout=0.0,
              save_dir=str(save_dir), device="cpu", progress_bar=False, log_interval=1000)
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(save_dir / "checkpoint_best.pt")[0].eval()


@pytest.mark.slow
def test_trained_experts_give_different_distributions_and_samples(distinct_experts, tiny_bin,
                                                                  one_thread):
    """docs/design.md section 1: after training on distinct domains, the expert tokens must select
    different models (a fairseq user once trained K copies of one model without noticing)."""
    model, K = distinct_experts, 3
    V = model.config.vocab_size
    valid = BinarizedDataset(tiny_bin, "valid")
    kl, contexts = torch.zeros(K, K, dtype=torch.float64), 0
    for d in range(len(valid)):
        doc = valid.document(d)[:20].tolist()
        for n in (0, 5, 20):  # a document's start, and a few of its tokens in
            with torch.no_grad():
                logits = model.next_token_logits(torch.tensor([[V + k, *doc[:n]]
                                                               for k in range(K)]))
            logp = F.log_softmax(logits.double(), dim=-1)  # (K, V), -inf at special ids
            p = logp.exp()
            for a in range(K):
                for b in range(K):
                    kl[a, b] += torch.where(p[a] > 0, p[a] * (logp[a] - logp[b]), 0.0).sum()
            contexts += 1
    kl /= contexts
    off_diagonal = kl[~torch.eye(K, dtype=torch.bool)]
    # measured: every ordered pair of experts 0.69 to 1.12 nats (mean 0.89); the 20-update
    # model: mean 0.03; experts that ignore their token: exactly 0
    assert off_diagonal.min() > 0.2, kl
    # and they score text differently (token_log_probs): per token, each pair of experts' log p
    # of a document's first 63 tokens differ by 0.077 to 0.20 nats on average (measured)
    chunks = torch.tensor([valid.document(d)[:63].tolist() for d in range(len(valid))])
    with torch.no_grad():
        ll = model.expert_log_likelihoods(chunks, torch.full((len(valid),), 63)) / 63  # (D, K)
    apart = (ll[:, :, None] - ll[:, None, :]).abs().mean(0)  # (K, K)
    assert apart[~torch.eye(K, dtype=torch.bool)].min() > 0.02, apart
    tokenizer = valid.tokenizer()
    for prompt in ("", "the", tokenizer.decode(valid.document(0)[:6].tolist())):
        config = GenerationConfig(max_new_tokens=12, min_len=12, sampling=True, seed=1)
        samples = [generate(model, tokenizer, prompt, expert=k, config=config) for k in range(K)]
        assert len(set(samples)) == K, samples  # one seed, K experts: K different texts


# ----------------------------------------------------------------------------- interactive session


def test_interactive_auto_answers_with_the_expert_of_highest_posterior(tiny_bin, ckpt, model,
                                                                       tokenizer, monkeypatch,
                                                                       capsys):
    valid = BinarizedDataset(tiny_bin, "valid")
    prompt = tokenizer.decode(valid.document(0)[:40].tolist())
    posterior = expert_posterior(model, tokenizer, prompt)
    assert float(posterior.max() - posterior.min()) > 0.01  # the argmax is not a tie
    rc, out, _ = run_cli(["interactive", str(tiny_bin), "--path", str(ckpt), "--gen-expert",
                          "auto", "--max-len-b", "2", "--prompt", prompt], "", monkeypatch,
                         capsys)
    assert rc == 0
    label = re.match(r"\[expert (\d+), posterior ([\d.]+)\]", out)
    assert label, out
    best = int(posterior.argmax())
    assert (int(label[1]), label[2]) == (best, f"{float(posterior[best]):.3f}")


def test_interactive_samples_each_prompt_from_one_seeded_stream(tiny_bin, ckpt, monkeypatch,
                                                                 capsys):
    """As fairseq-interactive: one seed per session, so a repeated prompt gets a new sample
    (a generator reseeded per prompt would repeat the first answer)."""
    argv = ["interactive", str(tiny_bin), "--path", str(ckpt), "--sampling", "--max-len-b", "12"]
    rc, out, _ = run_cli(argv, "the\nthe\n", monkeypatch, capsys)
    assert rc == 0
    first, second = [line for line in out.splitlines() if line.startswith("[expert 0]")]
    assert first != second
    assert run_cli(argv, "the\nthe\n", monkeypatch, capsys)[1] == out  # and the seed repeats it
