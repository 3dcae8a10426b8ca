"""What `eval-lm` and `interactive` share: the checkpoint to load, checked against the data-bin
and against the model flags a fairseq command passes (which must agree with the checkpoint)."""

from __future__ import annotations

import argparse
import sys

from moelab.errors import MoelabError
from moelab.train.distributed import resolve_device
from moelab.train.run import Run


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA_BIN, --path, the model-shape flags (checked against the checkpoint), fairseq flags."""
    parser.add_argument("data", metavar="DATA_BIN", help="data-bin folder (moelab preprocess)")
    parser.add_argument("--path", required=True, metavar="CKPT",
                        help="checkpoint written by `moelab train` (e.g. checkpoint_best.pt)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N]")
    parser.add_argument("--cpu", action="store_true", help="same as --device cpu (fairseq flag)")
    shape = parser.add_argument_group(
        "model flags (read from the checkpoint; if given they must agree with it)")
    shape.add_argument("--num-experts", type=int, default=None, metavar="K")
    shape.add_argument("--method", default=None, help="the training method, e.g. hMoEup")
    shape.add_argument("--mean-pool-gating-network", action="store_true", default=None)
    shape.add_argument("--mean-pool-gating-network-encoder-dim", type=int, default=None,
                       metavar="N")
    shape.add_argument("--mean-pool-gating-network-dropout", type=float, default=None,
                       metavar="X", help="no effect at inference (dropout is off)")
    compat = parser.add_argument_group("fairseq compatibility (accepted and explained)")
    compat.add_argument("--task", default=None, help="only language_model_moe")
    compat.add_argument("--user-dir", default=None, help="ignored: the MoE code is built in")


def load_run(args: argparse.Namespace, command: str) -> Run:
    """The checkpoint of --path as a Run on --device, with DATA_BIN's tokenizer (refused if it is
    not the checkpoint's); notes about the flags given are printed to stderr."""
    notes = _fairseq_notes(args, command)
    try:
        device = resolve_device("cpu" if args.cpu else args.device)
    except (ValueError, RuntimeError) as e:
        raise MoelabError(str(e)) from None
    run = Run.load(args.path, data_bin=args.data, device=device)
    for note in notes + _check_flags(args, run):
        print(f"moelab {command}: note: {note}", file=sys.stderr)
    return run


def _fairseq_notes(args: argparse.Namespace, command: str) -> list[str]:
    task = getattr(args, "task", None)
    if task not in (None, "language_model_moe"):
        raise MoelabError(f"--task {task} is not supported: `moelab {command}` runs the "
                          "language_model_moe task (drop --task)")
    notes = []
    if task is not None:
        notes.append("--task language_model_moe is built into moelab; the flag is not needed")
    if getattr(args, "user_dir", None) is not None:
        notes.append(f"moelab's MoE task and model are part of the package; --user-dir "
                     f"{args.user_dir} is ignored")
    return notes


def _check_flags(args: argparse.Namespace, run: Run) -> list[str]:
    """Model flags must describe the checkpoint; refuse a mismatch instead of misreading it."""
    notes = []
    config, method, K = run.model_config, run.method, run.num_experts
    if args.num_experts is not None and args.num_experts != K:
        raise MoelabError(f"--num-experts {args.num_experts} does not match the checkpoint "
                          f"{args.path}: it was trained with K={K} experts; pass "
                          f"--num-experts {K} or drop the flag")
    if args.method is not None and method is not None and args.method != method:
        raise MoelabError(f"--method {args.method} does not match the checkpoint {args.path}: "
                          f"it was trained with --method {method}; pass --method {method} or "
                          "drop the flag")
    gating_flags = (args.mean_pool_gating_network or
                    args.mean_pool_gating_network_encoder_dim is not None)
    if not config.gating and gating_flags:
        notes.append(f"the checkpoint has a uniform prior (--method {method}): it has no gating "
                     "network, so --mean-pool-gating-network* flags are unused")
    dim = args.mean_pool_gating_network_encoder_dim
    if config.gating and dim is not None and dim != config.gating_dim:
        raise MoelabError(f"--mean-pool-gating-network-encoder-dim {dim} does not match the "
                          f"checkpoint {args.path}: its gating network has width "
                          f"{config.gating_dim}; pass {config.gating_dim} or drop the flag")
    dropout = args.mean_pool_gating_network_dropout
    if config.gating and dropout is not None and dropout != config.gating_dropout:
        notes.append(f"--mean-pool-gating-network-dropout {dropout} has no effect at inference "
                     "(dropout is off)")
    return notes
