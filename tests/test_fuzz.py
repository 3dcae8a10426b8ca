"""Fuzzing with hypothesis: corpus readers, preprocessing, the generation prompt path, the CLI.

The promise under test: whatever the input, moelab ends in success, a one-line MoelabError (exit
status 2) or an argparse usage error (SystemExit 2) -- never a traceback a user cannot act on --
and never leaves a half-written output file. Example counts are modest for CI; set
MOELAB_FUZZ_SCALE=10 (say) for a longer local run. Each target prints how many examples ran
(`pytest -s tests/test_fuzz.py`).

A fuzz test whose examples all end early (every input refused, every run an error) would pass
without testing the deep path, so each test asserts a floor on the examples that ran to the END
of its interesting path: documents read, a complete data-bin checked for losslessness, a
generated text checked, a training run whose checkpoint and log were checked. The floors are
about half of what the derandomized examples reach (`pytest -s` prints both).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelab.cli import build_parser, main
from moelab.data import BinarizedDataset, PreprocessConfig, Tokenizer, open_corpus, preprocess
from moelab.data.corpus import UNKNOWN_DOMAIN
from moelab.errors import MoelabError
from moelab.train import train
from moelab.train.checkpoint import read_checkpoint

SCALE = float(os.environ.get("MOELAB_FUZZ_SCALE", "1"))
settings.register_profile(
    "moelab-fuzz", deadline=None, derandomize=SCALE == 1, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])


def fuzz(examples: int):
    return settings(settings.get_profile("moelab-fuzz"), max_examples=max(1, int(examples * SCALE)))


COUNTS: dict[str, int] = {}

# Floors, as fractions of each test's examples: about half the least that derandomized and random
# runs reached when they were set (in brackets), so that only a real change trips them.
FLOOR_CORPUS = 0.1  # corpora read and every document checked (0.2 - 0.5)
FLOOR_PREPROCESS = 0.12  # complete, lossless data-bins (0.25 - 0.62)
FLOOR_GENERATED = 0.5  # non-empty generated text (1.0)
FLOOR_CLI_TRAIN = 0.02  # `train` argv that reach fit: flags parsed, config valid (0.047 - 0.087)
FLOOR_CLI_OTHERS = 0.07  # preprocess / eval-lm / interactive that ran to exit 0 (0.15 - 0.21)
FLOOR_TRAINED = 0.15  # real training runs whose checkpoint and log were checked (0.27 - 0.6)


def _count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


def run_with_floors(fuzz_test, *args, examples: int, floors: dict[str, float]) -> None:
    """Run a hypothesis test, then require that at least `fraction * examples` examples reached
    each counted point (`_count(point)` at the end of an interesting path)."""
    before = dict(COUNTS)
    fuzz_test(*args)
    ran = max(1, int(examples * SCALE))
    for point, fraction in floors.items():
        reached = COUNTS.get(point, 0) - before.get(point, 0)
        need = max(1, math.floor(fraction * ran))
        assert reached >= need, (
            f"only {reached} of {ran} examples reached '{point}' (floor {need}): the fuzz "
            "inputs no longer get past the early exits, so the deep path goes untested")


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz examples run: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def workdir():
    """A fresh temporary folder as the current directory (relative outputs land in it)."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def assert_no_half_written_output(root: Path) -> None:
    """No temporary or staging leftovers; every checkpoint and data-bin under root opens."""
    for path in root.rglob("*"):
        assert not path.name.endswith(".tmp"), f"left behind: {path}"
        assert not path.name.startswith(".moelab-staging"), f"left behind: {path}"
        if path.suffix == ".pt" and path.is_file():
            read_checkpoint(path)
        if path.name == "meta.json":
            meta = json.loads(path.read_text())
            for split in meta["splits"]:
                BinarizedDataset(path.parent, split)


# --------------------------------------------------------------------------- inputs

odd_text = st.one_of(
    st.text(max_size=300),
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.text(st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x85\u2028\u2029\ufeff\u200b")), max_size=20),
    st.text(st.sampled_from(list("ab \n\u0301\u202e\U0001f600\x7f\x01\\\"{}[]")), max_size=80),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "ab ", "\u00e9", "\U0001f600", "\n"]),
              st.integers(1_000, 60_000)),  # huge lines, huge documents
)
raw_bytes = st.one_of(
    st.binary(max_size=500),
    odd_text.map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"\xff\xfe\xfa", b"\xc3", b"ok\x00ok", b"\xed\xa0\x80", b"\n\n\n", b""]),
)


def json_line():
    record = st.fixed_dictionaries(
        {"text": st.one_of(odd_text, st.integers(), st.none())},
        optional={"domain": st.one_of(st.text(max_size=10), st.integers(), st.none()),
                  "id": st.one_of(st.text(max_size=10), st.integers())})
    return st.one_of(
        record.map(lambda r: json.dumps(r, ensure_ascii=False)),
        record.map(json.dumps),  # \uXXXX escapes, lone surrogates included
        st.sampled_from(['{"text": "a\\ud800b"}', '{"text": "\\udfff"}', "[" * 5000, "{}",
                         '"just a string"', "null", '{"text": "x", "domain": {"a": 1}}', "",
                         '{"text": "", "domain": "d"}']),
        st.text(max_size=50),
    )


def _write_corpus(root: Path, kind: str, files: list[bytes], lines: list[str]) -> Path:
    if kind == "jsonl":
        path = root / "corpus.jsonl"
        path.write_bytes(b"\n".join(line.encode("utf-8", "surrogatepass") for line in lines))
        return path
    if kind == "txt":
        path = root / "corpus.txt"
        path.write_bytes(b"\n\n".join(files))
        return path
    folder = root / "corpus"
    for i, data in enumerate(files):
        domain = folder / ("dom", "d\u00e9", "x y", ".hidden")[i % 4]
        domain.mkdir(parents=True, exist_ok=True)
        (domain / f"f{i}.txt").write_bytes(data)
    folder.mkdir(exist_ok=True)
    return folder


corpora = st.tuples(st.sampled_from(["folder", "jsonl", "txt"]),
                    st.lists(raw_bytes, max_size=6), st.lists(json_line(), max_size=6))


# --------------------------------------------------------------------------- corpus readers


@fuzz(200)
@given(corpus=corpora)
def _fuzz_corpus_readers(corpus):
    _count("corpus readers")
    kind, files, lines = corpus
    with workdir() as root:
        path = _write_corpus(root, kind, files, lines)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                docs = list(open_corpus(path))
        except MoelabError as e:
            assert "\n" not in str(e).strip() or len(str(e)) < 2000
            return
        for doc in docs:
            assert isinstance(doc.text, str) and doc.text.strip()
            doc.text.encode("utf-8")  # valid Unicode: the tokenizer can take it
            assert isinstance(doc.domain, str) and doc.domain
            assert doc.key.startswith(f"{doc.domain}/")
            if kind != "folder":
                assert kind == "jsonl" or doc.domain == UNKNOWN_DOMAIN
        if docs:
            _count("corpus readers: documents checked")


@pytest.mark.slow
def test_fuzz_corpus_readers():
    run_with_floors(_fuzz_corpus_readers, examples=200,
                    floors={"corpus readers": 0.95,
                            "corpus readers: documents checked": FLOOR_CORPUS})


# --------------------------------------------------------------------------- preprocess

WORDS = ["the", "of", "cat", "sat", "\u00e9t\u00e9", "def", "x = 1", "\U0001f600", "\t", "\n",
         "  ", "\u0641\u064a", "\u4e2d\u6587", "0123", "\r\n"]
small_docs = st.lists(st.one_of(
    st.lists(st.sampled_from(WORDS), min_size=5, max_size=300).map(" ".join),
    st.text(max_size=200),
    st.text(st.sampled_from(list("abcdefgh \n\t\u00e9\U0001f600\r")), min_size=1, max_size=400),
    st.sampled_from(["   ", "\n", "x", "\x00", "a\u0000b"]),
), max_size=8)


@fuzz(40)
@given(docs=small_docs, kind=st.sampled_from(["folder", "jsonl", "txt"]),
       vocab=st.sampled_from([1, 260, 300, 400, 5000]),
       fractions=st.sampled_from([(0.0, 0.0), (0.2, 0.2), (0.3, 0.3), (0.9, 0.0)]))
def _fuzz_preprocess(docs, kind, vocab, fractions):
    """Either a complete, lossless data-bin or a MoelabError and no data-bin at all."""
    _count("preprocess")
    with workdir() as root:
        files = [d.encode("utf-8") for d in docs]
        lines = [json.dumps({"text": d, "domain": f"d{i % 2}"}) for i, d in enumerate(docs)]
        path = _write_corpus(root, kind, files, lines)
        dest = root / "bin"

        def run(vocab_size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return preprocess(PreprocessConfig(
                    destdir=str(dest), data=str(path), vocab_size=vocab_size,
                    valid_fraction=fractions[0], test_fraction=fractions[1]))

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                originals = {d.key: d.text for d in open_corpus(path)}
            try:
                meta = run(vocab)
            except MoelabError as e:
                # a vocabulary that does not fit names one that does: it must work
                advised = re.search(r"(?:largest .* is|at least) (\d+)", str(e))
                assert not dest.exists() or not any(dest.iterdir()), list(dest.iterdir())
                if advised is None:
                    raise
                meta = run(int(advised.group(1)))
                if "at least" in advised.group(0):  # and it is the smallest that works
                    shutil.rmtree(dest)
                    with pytest.raises(MoelabError, match="too small"):
                        run(int(advised.group(1)) - 1)
                    meta = run(int(advised.group(1)))
        except MoelabError as e:
            assert not dest.exists() or not any(dest.iterdir()), list(dest.iterdir())
            if os.environ.get("MOELAB_FUZZ_DEBUG"):  # which errors the fuzz meets
                _count("preprocess: " + str(e)[:300])
            return
        assert_no_half_written_output(root)
        seen = 0
        for split in meta["splits"]:
            ds = BinarizedDataset(dest, split)
            tokenizer = ds.tokenizer()
            keys = [json.loads(x)["key"] for x in (dest / f"{split}.docs.jsonl").open()]
            for i, key in enumerate(keys):
                # lossless, except for U+2581 itself: SentencePiece's own name for the space
                if "\u2581" not in originals[key]:
                    assert tokenizer.decode(ds.document(i)) == originals[key]
                seen += 1
        assert seen == len(originals)
        _count("preprocess: complete data-bins checked")


def test_fuzz_preprocess():
    run_with_floors(_fuzz_preprocess, examples=40,
                    floors={"preprocess: complete data-bins checked": FLOOR_PREPROCESS})


# --------------------------------------------------------------------------- generation

prompts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(blacklist_categories=()), max_size=40),  # lone surrogates included
    st.text(st.sampled_from(list("\x00\x01\x07\x1b\r\n\t\x7f\u200b\ufffd\u202e")), max_size=30),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "\u00e9 ", "\U0001f600", "\n"]),
              st.integers(20, 1_500)),  # far longer than the 16-token context
    st.just(""),
)


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tiny_bin):
    from moelab.data.tokenizer import PAD_ID
    from moelab.model import MixtureLM, ModelConfig

    tokenizer = Tokenizer.load(tiny_bin / "spm.model")
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(vocab_size=tokenizer.vocab_size, num_experts=2, n_layer=1,
                                  n_embd=32, n_head=2, ffn_dim=64, max_seq_len=16, gating=True,
                                  gating_dim=16, dropout=0.0, pad_id=PAD_ID)).eval()
    return model, tokenizer


@fuzz(100)
@given(prompt=prompts, expert=st.sampled_from([0, 1, "auto"]), seed=st.integers(0, 3),
       top_p=st.sampled_from([1.0, 0.9, 1e-6]), temperature=st.sampled_from([1.0, 0.3, 50.0]))
def _fuzz_generation_prompt_path(tiny_model_and_tokenizer, prompt, expert, seed, top_p,
                                 temperature):
    from moelab.generate import (
        GenerationConfig,
        PromptTruncatedWarning,
        beam_search,
        encode_prompt,
        expert_posterior,
        generate,
        stream,
    )

    _count("generation prompts")
    model, tokenizer = tiny_model_and_tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids = encode_prompt(model, tokenizer, prompt)
        assert len(ids) <= model.config.max_seq_len - 1
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        posterior = expert_posterior(model, tokenizer, prompt)
        assert posterior.shape == (2,) and torch.isfinite(posterior).all()
        assert math.isclose(float(posterior.sum()), 1.0, rel_tol=1e-6)
        greedy = GenerationConfig(max_new_tokens=6)
        text = generate(model, tokenizer, prompt, expert=expert, config=greedy)
        assert isinstance(text, str)
        assert "".join(stream(model, tokenizer, prompt, expert=expert, config=greedy)) == text
        sampled = GenerationConfig(max_new_tokens=6, sampling=True, top_p=top_p,
                                   temperature=temperature, seed=seed)
        again = [generate(model, tokenizer, prompt, expert=expert, config=sampled)
                 for _ in range(2)]
        assert again[0] == again[1]  # a seed fixes the sample
        beams = beam_search(model, tokenizer, prompt, expert=1,
                            config=GenerationConfig(max_new_tokens=4, beam=3))
        assert isinstance(beams, str)
    _count("generation prompts: complete")
    if text:
        _count("generation prompts: text generated")


def test_fuzz_generation_prompt_path(tiny_model_and_tokenizer):
    run_with_floors(_fuzz_generation_prompt_path, tiny_model_and_tokenizer, examples=100,
                    floors={"generation prompts: complete": 0.95,
                            "generation prompts: text generated": FLOOR_GENERATED})


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A very small data-bin, a corpus folder and a 1-update checkpoint trained on them."""
    from conftest import write_synthetic_corpus

    root = tmp_path_factory.mktemp("fuzz-micro")
    corpus = write_synthetic_corpus(root / "corpus", docs_per_domain=6, words_per_doc=40)
    data = root / "bin"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess(PreprocessConfig(destdir=str(data), data=str(corpus), vocab_size=300,
                                    valid_fraction=0.2, test_fraction=0.2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored after: a module fixture must not change later tests
    try:
        train(data, arch="tiny", method="hMoElp", num_experts=2, max_update=1, decoder_layers=1,
              decoder_embed_dim=32, decoder_attention_heads=2, decoder_ffn_embed_dim=64,
              tokens_per_sample=32, max_tokens=256, save_dir=root / "ckpt", device="cpu",
              progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    (root / "empty.txt").write_text("")
    return {"data": data, "corpus": corpus, "ckpt": root / "ckpt" / "checkpoint_best.pt",
            "binary": root / "binary.txt", "empty": root / "empty.txt"}


def _flags(command: str) -> dict[str, object]:
    """The real option strings of a sub-command -> its argparse action."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: action for action in sub.choices[command]._actions
            for name in action.option_strings if name not in ("-h", "--help")}


FLOATS = ["nan", "inf", "-inf", "-1", "0", "1e-9", "0.001", "0.5", "0.99", "1", "2", "1e30"]
INTS = ["-1", "0", "1", "2", "3"]
GARBAGE = ["", "x", "1.5", "1e3", "--", "-", "\udcff", "(", "__import__('os').system('touch x')"]
SAFE_NAMES = ["out", "out/sub", "checkpoints", "same", "", ".", "a b", "\u00e9", "out.jsonl"]
# Small values for the flags that size the work, so that each example stays cheap.
SIZES = {
    "--max-update": ["-1", "0", "1", "2"], "--max-epoch": ["-1", "0"],
    "--update-freq": ["0", "1", "2"], "--tokens-per-sample": ["0", "1", "8", "32", "64"],
    "--max-tokens": ["0", "1", "8", "64", "256", "100000"],
    "--max-sentences": ["-1", "0", "1", "4"], "--batch-size": ["0", "2"],
    "--num-experts": ["-1", "0", "1", "2", "3"], "--decoder-layers": ["0", "1", "2"],
    "--decoder-embed-dim": ["-1", "0", "6", "16", "32"], "--decoder-ffn-embed-dim": ["0", "16"],
    "--decoder-attention-heads": ["0", "1", "2", "3"],
    "--mean-pool-gating-network-encoder-dim": ["0", "8"], "--warmup-updates": ["-1", "0", "2"],
    "--log-interval": ["0", "1", "100"], "--validate-interval-updates": ["-1", "0", "1"],
    "--save-interval-updates": ["-1", "0", "1"], "--max-bad-updates": ["0", "1", "10"],
    "--seed": ["-1", "0", "1", "4294967296"], "--arch": ["tiny", "nope"],
    "--adam-betas": ["(0.9, 0.98)", "(0.9,)", "(nan, 0.5)", "0.9", "(1.5, 0.5)", "[0.9, 0.99]",
                     "__import__('os').system('touch pwned')"],
    "--device": ["cpu", "cuda", "cuda:7", "mps", "auto", "foo", "", "meta"],
    "--nwordssrc": ["-1", "0", "1", "300", "100000"], "--workers": ["-1", "0", "1"],
    "--max-len-b": ["-1", "0", "1", "5"], "--min-len": ["-1", "0", "1", "30"],
    "--beam": ["-1", "0", "1", "2", "3"], "--context-window": ["-1", "0", "1", "8", "31", "99"],
    "--gen-expert": ["0", "1", "2", "-1", "all", "auto", "x"],
}


def _value(flag: str, action, micro, tame: bool = False) -> st.SearchStrategy[list[str]]:
    """The argv items for one flag: none for switches, one value otherwise. `tame` draws
    mostly valid values, so that more runs go all the way."""
    if action.nargs == 0:
        return st.just([flag])
    if flag in ("--data", "--trainpref", "--validpref", "--testpref"):
        values = [str(micro["corpus"]), str(micro["binary"]), str(micro["empty"]), "missing",
                  str(micro["data"])]
    elif flag == "--path":
        values = [str(micro["ckpt"]), "missing.pt", str(micro["binary"]), str(micro["data"])]
    elif flag in ("--destdir", "--save-dir", "--results-dir", "--restore-file", "--user-dir"):
        values = SAFE_NAMES
    elif flag in SIZES:
        values = SIZES[flag]
    elif action.choices:
        values = [*map(str, action.choices), "nope"]
    elif action.type is int:
        values = ["1", "2"] if tame else INTS + GARBAGE[:4]
    elif action.type is float:
        values = ["0", "0.001", "0.1", "0.5"] if tame else FLOATS + GARBAGE[:3]
    else:
        values = ["language_model_moe", "hMoEup", "sMoElp", "dense", *GARBAGE, "a prompt"]
    wild = [*GARBAGE, *FLOATS, *INTS]
    value = st.integers(0, 19 if tame else 7).flatmap(  # mostly plausible, sometimes garbage
        lambda i: st.sampled_from(wild if i == 0 else values))
    if action.nargs == "?":
        return st.one_of(st.just([flag]), value.map(lambda v: [flag, v]))
    return value.map(lambda v: [flag, v])


@st.composite
def argvs(draw, micro, commands=("preprocess", "train", "eval-lm", "interactive")):
    command = draw(st.sampled_from(commands))
    flags = _flags(command)
    argv = [command]
    usual = draw(st.integers(0, 4)) > 0  # mostly a well-formed base command, to go deep
    if command == "preprocess" and usual:
        argv += ["--data", str(micro["corpus"]), "--destdir", "bin", "--nwordssrc", "300"]
    elif command != "preprocess":
        argv.append(str(micro["data"]) if usual else draw(st.sampled_from(
            ["missing", str(micro["binary"]), str(micro["corpus"]), ""])))
    if command in ("eval-lm", "interactive") and usual:
        argv += ["--path", str(micro["ckpt"])]
    if command == "train" and usual:
        argv += ["--max-update", "1"]
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=5)):
        argv += draw(_value(flag, flags[flag], micro))
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(1, len(argv))),
                    draw(st.sampled_from(["--no-such-flag", "-x", "--", "--lr=", "=", "-h"])))
    return argv


def _run_cli(argv: list[str], stdin: str = "") -> tuple[int, str]:
    """main(argv) -> (exit status, stderr); anything but a status from main or argparse fails."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), \
            mock.patch("sys.stdin", io.StringIO(stdin)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: usage error (2), --help / --version (0)
            code = e.code
            assert code in (0, 2), f"SystemExit({code!r}) from {argv}"
            return code, err.getvalue()
    assert code in (0, 2), f"exit status {code} from {argv}"
    if code == 2:
        message = err.getvalue().strip().splitlines()[-1]
        assert message.startswith("moelab ") and ": error: " in message, err.getvalue()
    return code, err.getvalue()


@fuzz(150)
@given(data=st.data())
def _fuzz_command_line(micro, data):
    """Random argv from the real flags of preprocess / train / eval-lm / interactive.

    Training itself is replaced by a stub here (the next test trains for real); everything
    before it -- flag parsing, config validation, fairseq notes -- is real, as are preprocess,
    eval-lm and interactive on a micro data-bin and checkpoint.
    """
    from moelab.train import command

    argv = data.draw(argvs(micro))
    stdin = data.draw(st.sampled_from(["", "hello\n", "\n\n", "x" * 500 + "\n", "\x00\x1b[31m\n"]))
    _count("command line")

    def fake_fit(config, dist, **kwargs):
        _count("command line: train reached fit")
        return mock.Mock(valid=None, num_updates=0, save_dir=config.train.save_dir)

    with workdir() as root, mock.patch.object(command, "fit", fake_fit):
        code, _ = _run_cli(argv, stdin)
        _count(f"command line: exit {code}")
        assert_no_half_written_output(root)
        assert not (root / "pwned").exists() and not (root / "x").exists()
    if code == 0 and argv[0] != "train":
        _count("command line: preprocess/eval-lm/interactive ran")


@pytest.mark.slow
def test_fuzz_command_line(micro):
    run_with_floors(_fuzz_command_line, micro, examples=150, floors={
        "command line: train reached fit": FLOOR_CLI_TRAIN,
        "command line: preprocess/eval-lm/interactive ran": FLOOR_CLI_OTHERS})


TRAIN_FLAGS = ["--method", "--num-experts", "--tokens-per-sample", "--max-tokens",
               "--max-sentences", "--update-freq", "--lr", "--dropout", "--attention-dropout",
               "--clip-norm", "--warmup-updates", "--warmup-init-lr", "--weight-decay",
               "--adam-betas", "--adam-eps", "--seed", "--validate-interval-updates",
               "--save-interval-updates", "--log-interval", "--max-bad-updates",
               "--decoder-embed-dim", "--decoder-attention-heads", "--decoder-layers",
               "--mean-pool-gating-network", "--mean-pool-gating-network-dropout",
               "--no-share-decoder-input-output-embed", "--restore-file", "--device"]


@fuzz(30)
@given(data=st.data())
def _fuzz_real_training_runs(micro, data):
    """Real `moelab train` runs with random values of the training flags (small sizes)."""
    flags = _flags("train")
    argv = ["train", str(micro["data"]), "--arch", "tiny", "--no-progress-bar",
            "--max-update", data.draw(st.sampled_from(["1", "2", "3"])),
            "--decoder-ffn-embed-dim", "32"]
    for flag in data.draw(st.lists(st.sampled_from(TRAIN_FLAGS), max_size=6)):
        argv += data.draw(_value(flag, flags[flag], micro, tame=True))
    _count("real training runs")
    with workdir() as root:
        code, err = _run_cli([*argv, "--save-dir", "run"])
        assert_no_half_written_output(root)
        _count(f"real training runs: exit {code}")
        if code == 2 and os.environ.get("MOELAB_FUZZ_DEBUG"):  # which errors the fuzz meets
            _count(err.strip().splitlines()[-1][:70])
        if code == 0:
            checkpoint = read_checkpoint(root / "run" / "checkpoint_last.pt")
            assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
            log = [json.loads(x) for x in (root / "run" / "train_log.jsonl").open()]
            assert log[-1]["kind"] == "valid" and log[-1]["update"] == checkpoint["num_updates"]
            assert checkpoint["num_updates"] >= 1
            _count("real training runs: trained and checked")


@pytest.mark.slow
def test_fuzz_real_training_runs(micro):
    run_with_floors(_fuzz_real_training_runs, micro, examples=30,
                    floors={"real training runs: trained and checked": FLOOR_TRAINED})
