"""Speed of `eval-lm` scoring and of sampling with and without the KV cache, in one run.

    python benchmarks/eval_and_sample.py [--data DATA_BIN] [--device cpu] [--json out.json]

Uses the `tiny` preset (random weights: speed does not depend on training) with K experts. Without
--data a small synthetic data-bin is written to a temporary folder. Figures:
- eval-lm: document tokens scored per second (each token by all K experts), for context-window 0
  and context-window T/2;
- sampling: new tokens per second at 256 new tokens (eos banned), KV cache on and off, and
  their ratio (the reference is the uncached run of the same process). Best of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelab.data import BinarizedDataset, PreprocessConfig, preprocess
from moelab.evaluate import evaluate
from moelab.generate import GenerationConfig, generate
from moelab.model import MixtureLM, config_from_preset


def synthetic_bin(root: Path, docs_per_domain: int = 40, words: int = 300) -> Path:
    """Three domains with their own letters, one file per document."""
    rng = random.Random(0)
    for d, domain in enumerate(("alpha", "beta", "gamma")):
        letters = "abcdefghijklmnopqrstuvwxyz"[d * 8 : d * 8 + 10]
        vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(50)]
        folder = root / "corpus" / domain
        folder.mkdir(parents=True)
        for i in range(docs_per_domain):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            (folder / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    destdir = root / "bin"
    preprocess(PreprocessConfig(destdir=str(destdir), data=str(root / "corpus"), vocab_size=512,
                                valid_fraction=0.2, test_fraction=0.2))
    return destdir


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="data-bin (default: a synthetic one in a temp folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--tokens-per-sample", type=int, default=256)
    parser.add_argument("--max-sentences", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a tiny model's small ops only wait "
                             "on each other with more, badly so on a shared machine)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else synthetic_bin(Path(tmp))
        ds = BinarizedDataset(data, "valid")
        tokenizer = ds.tokenizer()
        torch.manual_seed(0)
        T = args.tokens_per_sample
        # max_seq_len leaves room for the prompt + all new tokens: no window slide while sampling
        config = config_from_preset("tiny", vocab_size=ds.vocab_size, pad_id=ds.pad_id,
                                    num_experts=args.num_experts,
                                    max_seq_len=max(T, args.new_tokens + 64), dropout=0.0)
        model = MixtureLM(config).to(args.device).eval()
        figures: dict = {"device": args.device, "threads": torch.get_num_threads(),
                         "num_experts": args.num_experts, "tokens_per_sample": T,
                         "max_sentences": args.max_sentences, "documents": len(ds),
                         "tokens": int(ds.offsets[-1])}

        for C in (0, T // 2):
            seconds, _ = best_time(lambda C=C: evaluate(
                model, ds, tokens_per_sample=T, context_window=C,
                max_sentences=args.max_sentences, progress=False), args.repeat)
            figures[f"eval_tokens_per_s_context_{C}"] = figures["tokens"] / seconds

        def sample(use_cache: bool) -> str:
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, min_len=args.new_tokens,
                                   sampling=True, top_p=0.9, seed=1, use_cache=use_cache)
            return generate(model, tokenizer, "the", expert=0, config=cfg)

        cached_s, cached = best_time(lambda: sample(True), args.repeat)
        plain_s, plain = best_time(lambda: sample(False), args.repeat)
        figures["sample_tokens_per_s_cache"] = args.new_tokens / cached_s
        figures["sample_tokens_per_s_no_cache"] = args.new_tokens / plain_s
        figures["kv_cache_speedup"] = plain_s / cached_s
        figures["same_text_with_and_without_cache"] = cached == plain

    for key, value in figures.items():
        print(f"{key:36s} {value:.1f}" if isinstance(value, float) else f"{key:36s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
