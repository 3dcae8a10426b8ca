"""`moelab preprocess|train|...`: fairseq's commands with `fairseq-` replaced by
`moelab `.

One module per command (moelab/cli/<command>.py) with `HELP`, `add_arguments(parser)` and
`run(args) -> exit status`. Each command's flags are generated from its config dataclass
(moelab/cli/flags.py), so shell and Python callers share one set of defaults. Errors a user can
fix (MoelabError) print as one line and exit with status 2 (or the error's own exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

from moelab import __version__
from moelab.errors import MoelabError

# The commands in the order `moelab --help` lists them, with their help; `eval-lm` lives in
# eval_lm.py. The help is here, not in the modules, so that `moelab --help` imports none of them.
COMMANDS = {
    "preprocess": "binarize a corpus: SentencePiece BPE + memory-mapped token arrays",
    "train": "train a mixture-of-experts LM (or the dense baseline) by online EM",
    "interactive": "sample continuations of prompts (stdin, one per line) per expert",
    "eval-lm": "perplexity (mixture, oracle, per expert), responsibilities, clusters",
    "bench": "training/eval-lm/sampling speed vs a fairseq-style reference (one JSON line)",
    "demo": ("the whole study on the bundled corpus: train dense and the four methods, "
             "evaluate, compare, sample, report"),
}


def command_module(name: str) -> ModuleType:
    """The module of one command, imported on demand so that `import moelab.cli` stays light."""
    return importlib.import_module(f"moelab.cli.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` the flags of that one command alone (the others
    are listed, without their flags): `moelab preprocess` then imports no module of training,
    whose torch alone is about 250 MiB of a preprocess's memory."""
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Sequence-level mixture-of-experts language models trained by online EM.",
    )
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if only in (None, name):
            command = command_module(name)
            command.add_arguments(p)
            p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    named = next((a for a in argv if not a.startswith("-")), "")  # no option takes a value
    args = build_parser(only=named).parse_args(argv)
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
