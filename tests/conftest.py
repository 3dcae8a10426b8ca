"""Shared fixtures: one tiny data-bin with known domains drives most tests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moelab.data import PreprocessConfig, preprocess

DOMAINS = ("alpha", "beta", "gamma")


def write_synthetic_corpus(
    root: Path, *, docs_per_domain: int = 60, words_per_doc: int = 150, seed: int = 0
) -> Path:
    """A folder corpus of clearly distinct domains: each has its own words and word order.

    Domains share a few function words, so telling them apart needs the content words, as with
    real text.
    """
    rng = random.Random(seed)
    shared = ["the", "of", "and", "to", "in"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    for d, domain in enumerate(DOMAINS):
        alphabet = letters[d * 8 : d * 8 + 10]  # overlapping letter sets, distinct words
        words = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(3, 7)))
                        for _ in range(40)})
        # A domain-specific first-order chain over its words: each word has 3 likely successors.
        successors = {w: rng.sample(words, 3) for w in words}
        folder = root / domain
        folder.mkdir(parents=True)
        for i in range(docs_per_domain):
            word, out = rng.choice(words), []
            for j in range(words_per_doc):
                out.append(word)
                if j % 9 == 8:
                    out.append(rng.choice(shared))
                word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(words)
            lines = [" ".join(out[k : k + 12]) for k in range(0, len(out), 12)]
            (folder / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="session")
def tiny_bin(tiny_corpus, tmp_path_factory) -> Path:
    """A data-bin of 3 synthetic domains (alpha, beta, gamma), ~60 documents each, vocab 512."""
    destdir = tmp_path_factory.mktemp("bin") / "tiny"
    preprocess(PreprocessConfig(destdir=str(destdir), data=str(tiny_corpus), vocab_size=512,
                                valid_fraction=0.15, test_fraction=0.15))
    return destdir


TINY_T = 64  # tokens-per-sample (max_seq_len) of the tiny trained checkpoint


@pytest.fixture(scope="session")
def ckpt(tiny_bin, tmp_path_factory) -> Path:
    """A tiny hMoEup model (K=3) trained for a few updates, once per session."""
    from moelab.train import train

    save_dir = tmp_path_factory.getbasetemp() / "moelab-trained-tiny"
    path = save_dir / "checkpoint_best.pt"
    if not path.exists():
        train(str(tiny_bin), arch="tiny", method="hMoEup", num_experts=3, max_update=20,
              tokens_per_sample=TINY_T, max_tokens=512, warmup_updates=10, lr=3e-3,
              decoder_embed_dim=64, decoder_ffn_embed_dim=128, dropout=0.0,
              save_dir=str(save_dir), device="cpu", progress_bar=False, log_interval=100)
    return path


@pytest.fixture(scope="session")
def model(ckpt):
    from moelab.train import load_checkpoint

    return load_checkpoint(ckpt)[0]


@pytest.fixture
def one_thread():
    """Two torch threads on two shared cores run several times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def smoke_workbench(tiny_bin, tmp_path_factory):
    """Workbench(**overrides) on the tiny data-bin, smoke preset, K=3; runs shared per session."""
    from moelab.workbench import Workbench

    def make(**overrides):
        options = dict(data_bin=tiny_bin, runs_dir=tmp_path_factory.getbasetemp() / "wb-runs",
                       preset="smoke", num_experts=3)
        return Workbench(**{**options, **overrides})
    return make
