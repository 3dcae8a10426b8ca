"""`moelab preprocess|train|...`: the seed's fairseq commands with `fairseq-` replaced by `moelab `.

Each sub-command's flags come from its config dataclass's defaults, so shell and Python callers
share them. Errors a user can fix (MoelabError) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import fields

from moelab import __version__
from moelab.errors import MoelabError


def _defaults(cls) -> dict:
    return {f.name: f.default for f in fields(cls)}


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    from moelab.data.preprocess import PreprocessConfig

    d = _defaults(PreprocessConfig)
    src = parser.add_argument_group("input (exactly one of --bundled, --data, --trainpref)")
    src.add_argument("--bundled", action="store_true", help="the corpus that ships with moelab")
    src.add_argument("--data", metavar="PATH",
                     help="a folder with one sub-folder of text files per domain, or a .jsonl "
                          "file with 'text' and optional 'domain'; split by the fractions below")
    src.add_argument("--trainpref", metavar="PATH",
                     help="train split: a fairseq-style .txt (documents separated by blank "
                          "lines), a .jsonl, or a domain folder")
    src.add_argument("--validpref", metavar="PATH", help="valid split (same forms as --trainpref)")
    src.add_argument("--testpref", metavar="PATH", help="test split (same forms as --trainpref)")
    parser.add_argument("--destdir", required=True, help="output folder (the data-bin)")
    parser.add_argument("--nwordssrc", type=int, default=d["vocab_size"], dest="vocab_size",
                        help="SentencePiece vocabulary size (default: %(default)s)")
    parser.add_argument("--bpe", default="sentencepiece", choices=["sentencepiece"],
                        help="tokenizer: SentencePiece BPE, trained on the train split")
    parser.add_argument("--workers", type=int, default=d["workers"],
                        help="processes that encode the splits (default: %(default)s)")
    parser.add_argument("--valid-fraction", type=float, default=d["valid_fraction"],
                        help="share of each domain held out for valid with --data/--bundled")
    parser.add_argument("--test-fraction", type=float, default=d["test_fraction"],
                        help="share of each domain held out for test with --data/--bundled")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing non-empty --destdir (other files are kept)")
    parser.add_argument("--only-source", action="store_true",
                        help="accepted for fairseq compatibility: language-model data is always "
                             "source-only")


def run_preprocess(args: argparse.Namespace) -> int:
    from moelab.data.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        destdir=args.destdir, bundled=args.bundled, data=args.data, trainpref=args.trainpref,
        validpref=args.validpref, testpref=args.testpref, vocab_size=args.vocab_size,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
        workers=args.workers, force=args.force,
    )
    meta = preprocess(config)
    print(f"wrote {config.destdir}: vocabulary {meta['vocab_size']}, "
          f"{len(meta['domains'])} domain(s) {meta['domains']}")
    for split, stats in meta["splits"].items():
        print(f"  {split:5s} {stats['documents']:7d} documents {stats['tokens']:10d} tokens")
    return 0


def _commands() -> dict[str, tuple[str, Callable, Callable]]:
    """name -> (help, add_arguments, run). Imported lazily so `--help` stays fast."""
    from moelab.bench import add_bench_arguments, run_bench
    from moelab.demo import add_demo_arguments, run_demo
    from moelab.evaluate import add_eval_lm_arguments, run_eval_lm
    from moelab.generate import add_interactive_arguments, run_interactive
    from moelab.train.command import add_train_arguments, run_train

    return {
        "preprocess": ("binarize a corpus: SentencePiece BPE + memory-mapped token arrays",
                       add_preprocess_arguments, run_preprocess),
        "train": ("train a mixture-of-experts LM (or the dense baseline) by online EM",
                  add_train_arguments, run_train),
        "interactive": ("sample continuations of prompts (stdin, one per line) per expert",
                        add_interactive_arguments, run_interactive),
        "eval-lm": ("perplexity (mixture, oracle, per expert), responsibilities, clusters",
                    add_eval_lm_arguments, run_eval_lm),
        "bench": ("training/eval-lm/sampling speed vs a fairseq-style reference (one JSON line)",
                  add_bench_arguments, run_bench),
        "demo": ("the whole study on the bundled corpus: train dense and the four methods, "
                 "evaluate, compare, sample, report", add_demo_arguments, run_demo),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Sequence-level mixture-of-experts language models trained by online EM.",
    )
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MoelabError as e:
        if os.environ.get("MOELAB_DEBUG"):
            raise
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 143/130 after a SIGTERM/SIGINT stop
    except KeyboardInterrupt:
        print(f"moelab {args.command}: interrupted", file=sys.stderr)
        return 130
