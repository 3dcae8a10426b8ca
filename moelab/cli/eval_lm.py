"""`moelab eval-lm DATA_BIN --path CKPT`: fairseq's `fairseq-eval-lm` command.

Perplexity per method (mixture, oracle, each expert), responsibilities and cluster agreement on
one split; the closing lines are fairseq-eval-lm's, for scripts that parse them. Beyond fairseq:
--routing (routed inference beside the full mixture, moelab.eval.routing), --prior and --latent
(moelab.eval.latents), each named in the printed report and the JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from moelab.cli.checkpoint import add_checkpoint_arguments, load_run
from moelab.cli.flags import add_config_arguments, build_config
from moelab.data import BinarizedDataset, read_meta
from moelab.errors import MoelabError
from moelab.eval.latents import CACHED_FROM, LATENTS, PRIORS
from moelab.eval.lm import (
    EvalConfig,
    evaluate,
    format_result,
    write_results,
)

FLAGS = {
    "tokens_per_sample": dict(help="window length (default: the model's context length)",
                              metavar="T"),
    "context_window": dict(help="tokens of context before the T - C new tokens of each later "
                                "window", metavar="C"),
    "max_sentences": dict(help="windows per batch; each runs all K experts",
                          aliases=("--batch-size",), metavar="N"),
    "gen_subset": dict(help="split to evaluate", choices=["train", "valid", "test"]),
    "routing": dict(help="full: every expert scores every token; prefix:M: the expert of "
                         "highest posterior after the first M tokens scores the rest; "
                         "prefix:M,topk:K': the top K' experts, weighted by that posterior; "
                         "topk:K' alone: the top K' by the prior. Reported on the tokens after "
                         "the prefix beside the full mixture, with routing accuracy and expert "
                         "forwards per token", metavar="SCHEME"),
    "prior": dict(help="start: the model's own prior (at the document start, or from each "
                       "chunk's context); cached: the mean posterior on the valid split, as "
                       "DEMix", choices=list(PRIORS)),
    "latent": dict(help="document: one expert per document; chunk: every chunk of "
                        "tokens-per-sample tokens its own mixture, weighed by the prior read "
                        "from its context (what training optimises)", choices=list(LATENTS)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    ev = parser.add_argument_group("evaluation")
    add_config_arguments(parser, EvalConfig, specs=FLAGS, group=ev)
    # where the results go: no Python twin (evaluate() returns them), so no dataclass field
    ev.add_argument("--results-dir", default=None, metavar="DIR",
                    help="write {split}_*.csv and {split}_eval.json here (created if needed; "
                         "files of the same names are overwritten, other files are kept)")
    ev.add_argument("--no-progress-bar", action="store_true", help="no tqdm progress bar")


def run(args: argparse.Namespace) -> int:
    config = build_config(args, EvalConfig)
    trained = load_run(args, "eval-lm")
    dataset = BinarizedDataset(args.data, config.gen_subset)
    started = time.perf_counter()
    try:
        result = evaluate(trained.model, dataset, tokens_per_sample=config.tokens_per_sample,
                          context_window=config.context_window,
                          max_sentences=config.max_sentences, progress=not args.no_progress_bar,
                          routing=config.routing, prior=config.prior, latent=config.latent,
                          prior_dataset=prior_split(args.data, config.prior))
    except ValueError as e:
        raise MoelabError(str(e)) from None
    seconds = time.perf_counter() - started
    tokens = int(result.summary["tokens"])
    title = f"moelab eval-lm: {config.gen_subset} split of {args.data}, checkpoint {args.path}"
    print(format_result(result, title))
    mixture = float(result.perplexity.loc["overall", "mixture"])
    # fairseq-eval-lm's closing lines, for scripts that parse them
    print(f"| Evaluated {tokens} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.2f} "
          "tokens/s)")
    print(f"| Loss (base 2): {math.log2(mixture):.4f}, Perplexity: {mixture:.2f}")
    if args.results_dir is not None:
        settings = {"data": str(args.data), "path": str(args.path),
                    "tokens_per_sample": int(result.summary["tokens_per_sample"]),
                    "context_window": config.context_window,
                    "max_sentences": config.max_sentences, "seconds": seconds,
                    "routing": config.routing, "prior": config.prior, "latent": config.latent}
        written = write_results(result, args.results_dir, config.gen_subset, settings)
        print(f"moelab eval-lm: wrote {len(written)} files to {args.results_dir}",
              file=sys.stderr)
    return 0


def prior_split(data: str, prior: str) -> BinarizedDataset | None:
    """The split a cached prior is estimated on (None for --prior start)."""
    if prior != "cached":
        return None
    splits = sorted(read_meta(data)["splits"])
    if CACHED_FROM not in splits:
        raise MoelabError(f"--prior cached estimates the prior on the {CACHED_FROM} split, and "
                          f"{data} has none (it has {', '.join(splits)}): preprocess with "
                          f"--{CACHED_FROM}pref PATH, or use --prior start")
    return BinarizedDataset(data, CACHED_FROM)
