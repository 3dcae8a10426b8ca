"""moelab.widgets.Sampler driven without a browser: simulated clicks, then read the widgets."""

from __future__ import annotations

import html
import re

import pytest
import torch

import moelab.widgets
from moelab.generate import GenerationConfig, expert_posterior, generate
from moelab.widgets import Sampler


@pytest.fixture
def run(smoke_workbench):
    return smoke_workbench().run("hMoEup")


@pytest.fixture
def sampler(run):
    return Sampler(run.model, run.tokenizer, prompt="the", max_new_tokens=12, seed=3)


def test_click_with_one_expert_streams_its_text(sampler, run):
    sampler.expert.value = 1
    sampler.button.click()
    assert list(sampler.texts) == [1] and sampler.texts[1]
    assert len(sampler.outputs.children) == 1
    shown = sampler.outputs.children[0].value
    assert "expert 1" in shown and html.escape(sampler.texts[1]) in shown
    assert not sampler.button.disabled and sampler.posterior.value == ""
    assert "error" not in sampler.status.value
    # the same text as the library call with the same settings
    config = GenerationConfig(max_new_tokens=12, sampling=True, top_p=0.9, seed=3)
    assert sampler.texts[1] == generate(run.model, run.tokenizer, "the", expert=1, config=config)


def test_all_experts_side_by_side(sampler):
    sampler.expert.value = "all"
    texts = sampler.generate()
    assert sorted(texts) == [0, 1, 2] and all(texts.values())
    assert [p.value.split("</div>")[0].endswith(f"expert {k}")
            for k, p in zip(texts, sampler.outputs.children, strict=True)] == [True] * 3


def test_auto_shows_the_posterior_and_uses_the_best_expert(sampler, run):
    sampler.expert.value = "auto"
    sampler.prompt.value = "the of and"
    sampler.button.click()
    posterior = expert_posterior(run.model, run.tokenizer, "the of and")
    best = int(posterior.argmax())
    assert list(sampler.texts) == [best]
    shown = sampler.posterior.value
    assert f"expert {best} has the highest posterior" in shown
    for k in range(3):
        assert f"{float(posterior[k]):.3f}" in shown


def test_mixture_choice_samples_the_routed_mixture_of_the_top_experts(sampler, run):
    sampler.expert.value = "topk"
    sampler.top_k.value = 2
    sampler.prompt.value = "the of and"
    sampler.button.click()
    config = GenerationConfig(max_new_tokens=12, sampling=True, top_p=0.9, seed=3)
    expected = generate(run.model, run.tokenizer, "the of and", expert="topk:2", config=config)
    assert sampler.texts == {"topk:2": expected} and expected
    posterior = expert_posterior(run.model, run.tokenizer, "the of and")
    best = [int(k) for k in posterior.argsort(descending=True)[:2]]
    shown = sampler.posterior.value
    assert f"experts {best[0]}, {best[1]} have the highest posterior" in shown
    bold = re.findall(r"<tr style='font-weight:700'><td[^>]*>expert (\d+)<", shown)
    assert sorted(map(int, bold)) == sorted(best)
    assert f"mixture of experts {best[0]}, {best[1]}" in sampler.outputs.children[0].value
    assert "error" not in sampler.status.value


def test_seed_and_sliders_reach_the_sampler(sampler, run):
    sampler.expert.value = 0
    first = sampler.generate()[0]
    assert sampler.generate()[0] == first  # same seed, same text
    sampler.max_new_tokens.value, sampler.seed.value = 3, 5
    sampler.temperature.value, sampler.top_p.value = 0.5, 0.3
    config = sampler.config()
    assert (config.max_new_tokens, config.seed, config.temperature, config.top_p) == (
        3, 5, 0.5, 0.3)
    expected = generate(run.model, run.tokenizer, "the", expert=0, config=config)
    assert sampler.generate()[0] == expected


def test_text_appears_while_it_is_sampled(sampler, monkeypatch):
    seen = []

    def fake_stream(model, tokenizer, prompt, *, expert, config):
        for piece in ("one ", "two ", "three"):
            yield piece
            seen.append(sampler.panels[expert].value)  # what the user sees after each piece

    monkeypatch.setattr(moelab.widgets, "stream", fake_stream)
    sampler.expert.value = 2
    sampler.generate()
    assert "one " in seen[0] and "two" not in seen[0]
    assert "one two " in seen[1]
    assert sampler.texts[2] == "one two three"
    assert "▌" not in sampler.panels[2].value  # the cursor goes when the text is complete


def test_an_error_shows_in_the_status_line(sampler, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
        yield  # pragma: no cover

    monkeypatch.setattr(moelab.widgets, "stream", broken)
    sampler.expert.value = 0
    sampler.button.click()
    assert "RuntimeError: out of memory" in sampler.status.value
    assert not sampler.button.disabled


def test_a_one_expert_model_has_no_auto_or_all(run):
    from moelab.model import MixtureLM, ModelConfig

    torch.manual_seed(0)
    dense = MixtureLM(ModelConfig(vocab_size=run.tokenizer.vocab_size, num_experts=1, n_layer=1,
                                  n_embd=16, n_head=2, ffn_dim=32, max_seq_len=16)).eval()
    sampler = Sampler(dense, run.tokenizer, max_new_tokens=4)
    assert [v for _, v in sampler.expert.options] == [0]
    sampler.button.click()
    assert 0 in sampler.texts


def test_from_run_loads_the_best_checkpoint(run):
    sampler = Sampler.from_run(run.save_dir, max_new_tokens=2)
    assert sampler.model.num_experts == 3 and sampler.max_new_tokens.value == 2
    assert "hMoEup (K=3)" in sampler.widget.children[0].value
