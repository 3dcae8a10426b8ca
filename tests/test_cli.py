"""The command-line package: one parser, flags generated from the config dataclasses."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import MISSING, dataclass, field, fields

import pytest

from moelab import cli
from moelab.bench import BenchConfig
from moelab.cli import build_parser, main
from moelab.cli.flags import add_config_arguments, field_default
from moelab.cli.train import config_from_args
from moelab.data import PreprocessConfig
from moelab.demo import DemoConfig
from moelab.eval.lm import EvalConfig
from moelab.generate import GenerationConfig
from moelab.train import RunConfig
from moelab.train.config import CONFIG_CLASSES

# Each command with only its required arguments, and the config dataclasses its flags fill.
REQUIRED = {
    "preprocess": (["--destdir", "out"], (PreprocessConfig,)),
    "train": (["bin"], tuple(CONFIG_CLASSES.values())),
    "interactive": (["bin", "--path", "ckpt.pt"], (GenerationConfig,)),
    "eval-lm": (["bin", "--path", "ckpt.pt"], (EvalConfig,)),
    "bench": ([], (BenchConfig,)),
    "demo": ([], (DemoConfig,)),
}


def _parse(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *argv])


def test_every_command_is_covered_by_the_defaults_test():
    assert set(REQUIRED) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_shell_and_python_defaults_agree(command):
    """No optional flag given: every config field holds the dataclass's own default."""
    required, classes = REQUIRED[command]
    args = _parse(command, *required)
    for cls in classes:
        for f in fields(cls):
            default = field_default(f)
            if default is MISSING:  # a required field, given above
                continue
            assert getattr(args, f.name) == default, (
                f"`moelab {command}` gives {f.name}={getattr(args, f.name)!r}, "
                f"{cls.__name__}() gives {default!r}")


def test_interactive_seed_is_fairseqs_one_from_both_sides():
    assert _parse("interactive", "bin", "--path", "c").seed == GenerationConfig().seed == 1


def test_a_field_without_a_flag_fails_to_build():
    @dataclass
    class Settings:
        width: int = 3

    with pytest.raises(TypeError, match="Settings.width has no flag"):
        add_config_arguments(argparse.ArgumentParser(), Settings)


def test_generated_flags_take_name_alias_parser_and_flip_from_the_specs():
    @dataclass
    class Settings:
        size: int = 8
        names: list[str] = field(default_factory=lambda: ["a", "b"])
        cache: bool = True
        where: str | None = None

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Settings, specs={
        "size": dict(help="h", flag="--max-size", aliases=("--n",)),
        "names": dict(help="h", parse=lambda s: s.split(",")),
        "cache": dict(help="h", flag="--no-cache"),
        "where": dict(help="h"),
    })
    assert vars(parser.parse_args([])) == {"size": 8, "names": ["a", "b"], "cache": True,
                                           "where": None}
    assert vars(parser.parse_args(["--n", "2", "--names", "x,y", "--no-cache", "--where", "w"])) \
        == {"size": 2, "names": ["x", "y"], "cache": False, "where": "w"}


# ------------------------------------------------------- the original fairseq workflow's commands

SEED_PREPROCESS = """fairseq-preprocess --only-source --trainpref T/train.txt
    --validpref T/valid.txt --testpref T/test.txt --destdir data-bin/mix --bpe sentencepiece
    --nwordssrc 50257 --workers 20"""
SEED_TRAIN = """fairseq-train --ddp-backend='no_c10d' data-bin/mix/ --max-update 100000
    --task language_model_moe --user-dir examples/language_model_moe/src --method hMoEup
    --arch transformer_lm --share-decoder-input-output-embed --optimizer adam
    --adam-betas '(0.9, 0.98)' --clip-norm 0.0 --lr-scheduler inverse_sqrt
    --warmup-init-lr 1e-07 --warmup-updates 4000 --lr 0.0007 --min-lr 1e-09 --dropout 0.1
    --weight-decay 0.0 --criterion cross_entropy --max-tokens 3584 --num-experts 10
    --mean-pool-gating-network --mean-pool-gating-network-encoder-dim 512
    --mean-pool-gating-network-dropout 0.0"""
SEED_INTERACTIVE = """fairseq-interactive data-bin/mix --path checkpoints/checkpoint_best.pt
    --beam 1 --sampling --sampling-topp 0.9 --remove-bpe
    --task language_model_moe --user-dir examples/language_model_moe/src
    --method hMoEup --mean-pool-gating-network --mean-pool-gating-network-encoder-dim 512
    --mean-pool-gating-network-dropout 0.0 --num-experts 10 --gen-expert 0"""
SEED_EVAL_LM = """fairseq-eval-lm data-bin/biomed/ --path checkpoints/checkpoint_best.pt
    --max-sentences 2 --tokens-per-sample 512 --context-window 400 --task language_model_moe
    --user-dir ./examples/language_model_moe/src/ --num-experts 10 --mean-pool-gating-network
    --mean-pool-gating-network-encoder-dim 512 --mean-pool-gating-network-dropout 0.0"""


def _seed(command: str) -> argparse.Namespace:
    name, *argv = shlex.split(command)
    return build_parser().parse_args([name.removeprefix("fairseq-"), *argv])


def test_the_seeds_four_commands_parse_with_their_meaning():
    pre = _seed(SEED_PREPROCESS)
    assert (pre.vocab_size, pre.workers, pre.destdir, pre.only_source) == (50257, 20,
                                                                           "data-bin/mix", True)
    config = config_from_args(_seed(SEED_TRAIN))
    assert (config.model.num_experts, config.model.method, config.optim.lr,
            config.data.max_tokens, config.optim.adam_betas) == (10, "hMoEup", 7e-4, 3584,
                                                                 (0.9, 0.98))
    gen = _seed(SEED_INTERACTIVE)
    assert (gen.sampling, gen.top_p, gen.beam, gen.gen_expert, gen.remove_bpe) == (
        True, 0.9, 1, "0", "sentencepiece")
    ev = _seed(SEED_EVAL_LM)
    assert (ev.max_sentences, ev.tokens_per_sample, ev.context_window, ev.num_experts) == (
        2, 512, 400, 10)


# --------------------------------------------------------------------------- train's flags


def test_flags_share_the_dataclass_defaults():
    assert config_from_args(_parse("train", "bin", "--max-update", "5")) == \
        RunConfig.from_kwargs("bin", max_update=5)
    args = _parse("train", "bin", "--max-update", "5", "--adam-betas", "(0.9, 0.99)", "--lr",
                  "0.001", "--mean-pool-gating-network", "--batch-size", "8", "--no-progress-bar",
                  "--no-share-decoder-input-output-embed")
    config = config_from_args(args)
    assert config.optim.adam_betas == (0.9, 0.99) and config.optim.lr == 1e-3
    assert config.data.max_sentences == 8 and config.train.progress_bar is False
    assert config.model.share_decoder_input_output_embed is False


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "bin", "--max-update", "1", "--no-such-flag"])
    assert e.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--optimizer", "sgd", "--optimizer sgd is not supported"),
    ("--lr-scheduler", "cosine", "--lr-scheduler cosine is not supported"),
    ("--criterion", "label_smoothed_cross_entropy", "--criterion label_smoothed"),
    ("--task", "translation", "--task translation is not supported"),
])
def test_unsupported_fairseq_choices_are_clear_errors(tiny_bin, flag, value, message, capsys):
    assert main(["train", str(tiny_bin), "--max-update", "1", flag, value]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def test_a_moelab_error_is_one_line_with_status_2(tmp_path, capsys):
    assert main(["preprocess", "--destdir", str(tmp_path / "o")]) == 2  # no input given
    err = capsys.readouterr().err
    assert err.startswith("moelab preprocess: error: give exactly one input")
    assert err.count("\n") == 1


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("moelab.cli.demo.run", interrupted)
    try:
        status = main(["demo"])
    except KeyboardInterrupt:  # re-raised, it would stop the whole test session
        pytest.fail("Ctrl-C escaped main instead of ending with status 130")
    assert status == 130
    assert capsys.readouterr().err == "moelab demo: interrupted\n"


# --------------------------------------------------------------------------- help and devices


def help_entry(command: str, flag: str, capsys) -> str:
    """The help of one option of `moelab COMMAND --help`, on one line (wrapping undone)."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    entries = re.split(r"\n  (?=-)", capsys.readouterr().out)
    found = [" ".join(entry.split()) for entry in entries if entry.startswith(flag + " ")]
    assert len(found) == 1, f"{flag} not in `moelab {command} --help`"
    return found[0]


@pytest.mark.parametrize("command, flag", [("eval-lm", "--context-window"),
                                           ("train", "--max-update")])
def test_help_shows_a_zero_default(command, flag, capsys):
    """0 is a value a user may need to read (C = 0, or no update limit), not a missing one."""
    assert help_entry(command, flag, capsys).endswith("(default: 0)")


def test_cpu_flag_loads_on_the_cpu_even_when_a_gpu_is_seen(tiny_bin, ckpt, monkeypatch):
    """fairseq's --cpu wins over --device auto, which would pick the GPU."""
    import moelab.cli.checkpoint as checkpoint_cli

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    resolved = []
    real = checkpoint_cli.resolve_device
    monkeypatch.setattr(checkpoint_cli, "resolve_device",
                        lambda name: resolved.append(real(name)) or resolved[-1])
    args = _parse("eval-lm", str(tiny_bin), "--path", str(ckpt), "--cpu")
    run = checkpoint_cli.load_run(args, "eval-lm")
    assert [str(device) for device in resolved] == ["cpu"]
    assert next(run.model.parameters()).device.type == "cpu"


def test_a_command_loads_only_its_own_modules(tiny_corpus, tmp_path):
    """torch is about 250 MiB of a preprocess's memory: `moelab preprocess` (and `moelab --help`)
    must not import the training modules that bring it."""
    code = ("import sys\nfrom moelab.cli import main\n"
            f"status = main(['preprocess', '--data', {str(tiny_corpus)!r}, '--destdir', "
            f"{str(tmp_path / 'bin')!r}, '--nwordssrc', '300'])\n"
            "print('after preprocess:', status, 'torch' in sys.modules)\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('after help:', 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    lines = done.stdout.splitlines()
    assert "after preprocess: 0 False" in lines and lines[-1] == "after help: False", lines
    assert "train a mixture-of-experts LM" in done.stdout  # --help still lists every command
    assert (tmp_path / "bin" / "meta.json").is_file()
