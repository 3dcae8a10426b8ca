"""A domain the model never saw: `moelab preprocess --tokenizer` encodes a new corpus with the
training data-bin's tokenizer (training none), eval-lm scores it and shows which experts take it;
a data-bin with its own tokenizer is refused with the command that fixes it."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import pandas as pd
import pytest

from moelab.cli import main
from moelab.data import BinarizedDataset
from moelab.errors import MoelabError
from moelab.eval import evaluate_run
from moelab.train import Run


@pytest.fixture(scope="module")
def new_corpus(tmp_path_factory) -> Path:
    """Two domains of words the tiny corpus never used (one folder each, a few documents)."""
    root = tmp_path_factory.mktemp("new") / "corpus"
    rng = random.Random(7)
    for domain, words in {"delta": ["zebra", "quartz", "vexing", "jumbo"],
                          "epsilon": ["ox", "hymn", "fjord", "wyvern", "pyx"]}.items():
        (root / domain).mkdir(parents=True)
        for i in range(4):
            text = " ".join(rng.choice(words) for _ in range(40)) + "\n"
            (root / domain / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return root


def test_a_new_corpus_encoded_with_the_training_tokenizer_evaluates(tiny_bin, ckpt, new_corpus,
                                                                    tmp_path, monkeypatch,
                                                                    capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("--tokenizer must not train a new vocabulary")

    # moelab.data.preprocess as an attribute is the function: the module is in sys.modules
    module = importlib.import_module("moelab.data.preprocess")
    monkeypatch.setattr(module, "train_tokenizer", no_training)
    dest = tmp_path / "new-bin"
    assert main(["preprocess", "--testpref", str(new_corpus), "--tokenizer",
                 str(tiny_bin / "spm.model"), "--destdir", str(dest)]) == 0
    meta = json.loads((dest / "meta.json").read_text())
    trained_on = json.loads((tiny_bin / "meta.json").read_text())
    assert (dest / "spm.model").read_bytes() == (tiny_bin / "spm.model").read_bytes()
    assert meta["tokenizer_sha256"] == trained_on["tokenizer_sha256"]
    assert meta["tokenizer_from"] == str((tiny_bin / "spm.model").resolve())
    assert meta["vocab_size"] == trained_on["vocab_size"]
    assert list(meta["splits"]) == ["test"] and meta["domains"] == ["delta", "epsilon"]
    test = BinarizedDataset(dest, "test")
    tokenizer = test.tokenizer()
    texts = {tokenizer.decode(test.document(i)) for i in range(len(test))}
    assert texts == {p.read_text() for p in new_corpus.rglob("*.txt")}  # lossless

    capsys.readouterr()
    results = tmp_path / "results"
    assert main(["eval-lm", str(dest), "--path", str(ckpt), "--results-dir", str(results),
                 "--no-progress-bar"]) == 0
    out = capsys.readouterr().out
    assert "responsibilities" in out and "delta" in out and "epsilon" in out
    # which experts take the new domains: the table eval-lm writes is the Python API's
    shown = pd.read_csv(results / "test_responsibilities.csv", index_col=0)
    expected = evaluate_run(Run.load(ckpt, data_bin=dest), "test", cache=False,
                                                      progress=False).responsibilities
    pd.testing.assert_frame_equal(shown, expected, check_names=False, atol=1e-6)
    assert list(shown.index) == ["delta", "epsilon"]


def test_a_data_bin_folder_is_taken_as_its_tokenizer(tiny_bin, new_corpus, tmp_path):
    dest = tmp_path / "from-folder"
    assert main(["preprocess", "--data", str(new_corpus), "--tokenizer", str(tiny_bin),
                 "--destdir", str(dest)]) == 0
    assert (dest / "spm.model").read_bytes() == (tiny_bin / "spm.model").read_bytes()


def test_a_data_bin_with_its_own_tokenizer_is_refused_with_the_command_that_fixes_it(
        tiny_bin, ckpt, new_corpus, tmp_path, capsys):
    own = tmp_path / "own-bin"
    assert main(["preprocess", "--data", str(new_corpus), "--nwordssrc", "300",
                 "--destdir", str(own)]) == 0
    capsys.readouterr()
    assert main(["eval-lm", str(own), "--path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    fix = f"--tokenizer {tiny_bin / 'spm.model'}"
    assert "different tokenizers" in err and fix in err and len(err.strip().splitlines()) == 1
    with pytest.raises(MoelabError, match="--tokenizer"):
        Run.load(ckpt, data_bin=own)


def test_a_missing_tokenizer_is_a_clear_error(new_corpus, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "spm.model"
    assert main(["preprocess", "--data", str(new_corpus), "--tokenizer", str(missing),
                 "--destdir", str(tmp_path / "bin")]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "spm.model of the data-bin" in err
    assert not (tmp_path / "bin").exists()  # refused before anything was written


def test_a_split_without_trainpref_needs_a_tokenizer(new_corpus, tmp_path, capsys):
    assert main(["preprocess", "--testpref", str(new_corpus), "--destdir",
                 str(tmp_path / "bin")]) == 2
    assert "or --tokenizer to encode with an existing one" in capsys.readouterr().err
