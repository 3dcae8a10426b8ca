"""`moelab interactive DATA_BIN --path CKPT`: fairseq's `fairseq-interactive` command.

Reads prompts from stdin (one per line) or --prompt and prints one labelled continuation per
chosen expert (or one from the routed mixture of `--gen-expert topk:K'`), streaming as tokens
arrive. The generation flags are GenerationConfig's fields.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from moelab.cli.checkpoint import add_checkpoint_arguments, load_run
from moelab.cli.flags import add_config_arguments, build_config
from moelab.data.tokenizer import Tokenizer
from moelab.errors import MoelabError
from moelab.generate import (
    TOPK,
    GenerationConfig,
    PromptTruncatedWarning,
    encode_prompt,
    expert_posterior,
    routed_top_k,
    stream,
    top_experts,
)
from moelab.model import MixtureLM

FLAGS = {
    "max_new_tokens": dict(help="new tokens at most", flag="--max-len-b", metavar="N"),
    "sampling": dict(help="sample instead of greedy/beam"),
    "temperature": dict(help="divides the logits before sampling", metavar="X"),
    "top_p": dict(help="nucleus sampling mass (1, or fairseq's -1: off)", flag="--sampling-topp",
                  metavar="P"),
    "beam": dict(help="beam width; beam search when N > 1 without --sampling", metavar="N"),
    "min_len": dict(help="no eos before N new tokens", metavar="N"),
    "seed": dict(help="random seed of the sampling"),
    "use_cache": dict(help="recompute the whole context every token (slow; for checks)",
                      flag="--no-kv-cache"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    gen = parser.add_argument_group("generation")
    # which expert and where prompts come from: choices of this command, not of GenerationConfig
    gen.add_argument("--gen-expert", default="0", metavar="N|all|auto|topk:K'",
                     help="expert to continue the prompt: an index, `all` (one continuation per "
                          "expert), `auto` (highest posterior given the prompt) or `topk:K'` "
                          "(the mixture of the K' experts of highest posterior, weighted by the "
                          "posterior given the prompt and the text generated so far) "
                          "(default: %(default)s)")
    gen.add_argument("--prompt", default=None, metavar="TEXT",
                     help="one prompt instead of reading stdin (one prompt per line)")
    add_config_arguments(parser, GenerationConfig, specs=FLAGS, group=gen)
    gen.add_argument("--remove-bpe", nargs="?", const="sentencepiece", default=None,
                     metavar="BPE", help="accepted for fairseq: output is always detokenized")


def parse_expert(value: str, model: MixtureLM) -> list[int] | str:
    """--gen-expert -> the experts to answer with, "auto" or "topk:K'"."""
    K = model.num_experts
    if value in ("all", "auto"):
        return list(range(K)) if value == "all" else "auto"
    if value.startswith(TOPK):
        try:
            routed_top_k(model, value)
        except ValueError as e:
            raise MoelabError(f"--gen-expert {value}: {str(e).split(': ', 1)[1]}") from None
        return value
    try:
        k = int(value)
    except ValueError:
        k = None
    if k is None or not 0 <= k < K:
        raise MoelabError(f"--gen-expert {value} does not exist: the checkpoint has K={K} "
                          f"experts; choose one of {', '.join(map(str, range(K)))}, all, auto "
                          "or topk:K'")
    return [k]


def run(args: argparse.Namespace) -> int:
    config = build_config(args, GenerationConfig)
    trained = load_run(args, "interactive")
    model, tokenizer = trained.model, trained.tokenizer
    experts = parse_expert(args.gen_expert, model)
    if isinstance(experts, str) and experts.startswith(TOPK) and config.beam > 1 \
            and not config.sampling:
        raise MoelabError(f"--gen-expert {experts} with --beam {config.beam}: beam search "
                          "follows one expert; use --beam 1 (greedy, or --sampling) with topk, "
                          "or an expert index with --beam")
    # one generator for the whole session: each prompt continues the seeded stream
    generator = torch.Generator(next(model.parameters()).device).manual_seed(config.seed)
    if args.prompt is not None:
        prompts: list[str] | object = [args.prompt]
    else:
        if sys.stdin.isatty():
            print("moelab interactive: type a prompt per line (empty: no prompt); Ctrl-D ends",
                  file=sys.stderr)
        prompts = (line.rstrip("\n").rstrip("\r") for line in sys.stdin)
    for prompt in prompts:
        _answer(model, tokenizer, prompt, experts, config, generator)
    return 0


def _answer(model: MixtureLM, tokenizer: Tokenizer, prompt: str, experts: list[int] | str,
            config: GenerationConfig, generator: torch.Generator) -> None:
    """Print one labelled continuation (prompt + new text) per chosen expert, streaming."""
    if experts == "auto":
        posterior = expert_posterior(model, tokenizer, prompt)
        chosen = [int(posterior.argmax())]
        labels = [f"[expert {chosen[0]}, posterior {float(posterior[chosen[0]]):.3f}]"]
    elif isinstance(experts, str):  # topk:K': one continuation from the routed mixture
        posterior = expert_posterior(model, tokenizer, prompt)
        shown = ", ".join(f"{k} ({float(posterior[k]):.3f})"
                          for k in top_experts(posterior, routed_top_k(model, experts)))
        chosen, labels = [experts], [f"[mixture of experts {shown}: posterior given the prompt]"]
    else:
        chosen = list(experts)
        labels = [f"[expert {k}]" for k in chosen]
    for k, label in zip(chosen, labels, strict=True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            pieces = stream(model, tokenizer, prompt, expert=k, config=config,
                            generator=generator)
            first = next(pieces, "")
        for w in caught:
            print(f"moelab interactive: note: {w.message}", file=sys.stderr)
        shown = tokenizer.decode(_encode_quietly(model, tokenizer, prompt))
        print(f"{label} {shown}{first}", end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print(flush=True)


def _encode_quietly(model: MixtureLM, tokenizer: Tokenizer, prompt: str) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        return encode_prompt(model, tokenizer, prompt)
