"""moelab.generate and `moelab interactive`: KV cache, top-p, seeds, beam search, bad input, CLI."""

from __future__ import annotations

import io
import shlex
import warnings
from pathlib import Path

import pytest
import torch
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
    with pytest.raises(ValueError, match=r"K=3 experts; choose one of 0, 1, 2"):
        generate(model, tokenizer, "x", expert=3)
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


def test_stops_at_eos_and_never_emits_special_or_expert_tokens(model, tokenizer):
    logits = torch.zeros(1, model.config.total_vocab)
    logits[0, EOS_ID] = 100.0  # a model that always ends at once

    class EndsAtOnce(torch.nn.Module):
        config = model.config
        num_experts = model.num_experts

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def next_token_logits(self, input_ids, cache=None):
            return logits.expand(input_ids.shape[0], -1)

        def new_cache(self):
            return model.new_cache()

    assert generate(EndsAtOnce(), tokenizer, "x", config=GenerationConfig()) == ""
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
    """The seed README's command, `fairseq-X` -> `moelab X`, K shrunk to the tiny model's."""
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
    assert rc == 2 and "choose one of 0, 1, 2, all or auto" in err
    rc, _, err = run_cli([*base, "--num-experts", "10"], "x\n", monkeypatch, capsys)
    assert rc == 2 and "K=3" in err
    rc, _, err = run_cli([*base, "--beam", "2", "--sampling"], "x\n", monkeypatch, capsys)
    assert rc == 2 and "--beam 2 with --sampling" in err
    long_prompt = " ".join(f"w{i}" for i in range(200))
    rc, out, err = run_cli([*base, "--max-len-b", "3"], long_prompt + "\n", monkeypatch, capsys)
    assert rc == 0 and f"keeping its last {T - 1} tokens" in err
    assert out.startswith("[expert 0] ") and "w199" in out and "w0 " not in out
