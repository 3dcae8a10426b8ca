"""What routed inference saves and loses, in one run on one trained model.

- speed: eval-lm's full scoring (every expert on every token) against the routed pass of
  `--routing prefix:M` (all K experts on the first M tokens, the chosen K' after), alternated
  `--repeats` times on the documents longer than M (the ones routing scores); tokens/s of each
  (median), their ratio, and the expert forwards per token each pass ran (moelab.eval.routing counts
  them from the windows it runs), all over every token of those documents, prefix included;
- accuracy: for each M of `--prefixes`, routing accuracy (the top-1 choice after M tokens is the
  full-document winner) and the perplexity gap (routed against the full mixture on the same
  tokens after the prefix), from moelab.eval.routing.routing_curve, whose notes say which
  tokens each column counts.

    python benchmarks/routing.py --save-dir runs/hMoEup --data-bin data-bin/mix
    python benchmarks/routing.py               # trains hMoEup with Workbench(preset="cpu") first

Device, precision and torch threads are printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from moelab.data import Chunk
from moelab.eval.routing import Routing, forwards, routed_docs, routed_scores, routing_curve
from moelab.eval.windows import resolve_window, window_log_likelihoods
from moelab.report import to_markdown
from moelab.report.machine import device_name
from moelab.train import Run


def load(args: argparse.Namespace) -> Run:
    if args.save_dir is not None:
        return Run.load(args.save_dir, data_bin=args.data_bin, device=args.device)
    from moelab.workbench import Workbench

    options = {} if args.data_bin is None else {"data_bin": args.data_bin}
    return Workbench(preset=args.preset, device=args.device, **options).run("hMoEup")


def time_passes(run: Run, split: str, routing: Routing, *, repeats: int, max_sentences: int,
                tokens_per_sample: int | None, context_window: int) -> dict:
    """Full and routed passes alternated (after one untimed round each) over the documents the
    routing scores: median tokens/s, both over every token of those documents."""
    model, dataset = run.model, run.dataset(split)
    T, C = resolve_window(model, tokens_per_sample, context_window)
    every = np.diff(np.asarray(dataset.offsets, dtype=np.int64))
    docs = routed_docs(every, routing)  # the full pass reads the same documents as the routed
    lengths = every[docs]
    fetch = lambda d, s, e: dataset.chunk_tokens(Chunk(int(docs[d]), s, e))  # noqa: E731
    scoring = dict(tokens_per_sample=T, context_window=C, max_sentences=max_sentences,
                   pad_id=dataset.pad_id)
    log_prior = model.start_log_prior().numpy()
    full_forwards, routed_forwards, routed_tokens = forwards(lengths, routing,
                                                             model.num_experts, T, C)

    def full() -> None:
        window_log_likelihoods(model, len(lengths), lengths, fetch, **scoring)

    def routed() -> int:
        return routed_scores(model, lengths, fetch, log_prior, routing, **scoring).forwards

    seconds: dict[str, list[float]] = {"full": [], "routed": []}
    for round_ in range(repeats + 1):
        for name, job in (("full", full), ("routed", routed)):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            job()
            if round_:  # the first round warms up (allocations, caches)
                seconds[name].append(time.perf_counter() - started)
    full_tps = routed_tokens / statistics.median(seconds["full"])
    routed_tps = routed_tokens / statistics.median(seconds["routed"])
    return {"routing": str(routing), "documents": len(docs),
            "short_documents": len(every) - len(docs), "tokens": routed_tokens,
            "tokens_per_s_full": full_tps,
            "tokens_per_s_routed": routed_tps, "ratio": routed_tps / full_tps,
            "forwards_per_token_full": full_forwards / max(routed_tokens, 1),
            "forwards_per_token_routed": routed_forwards / max(routed_tokens, 1),
            "seconds_full": seconds["full"], "seconds_routed": seconds["routed"]}


def environment(device: str) -> dict:
    return {"device": device_name(device),
            "precision": "float32 (eval-lm scores in float32 on every device)",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-dir", default=None, help="a trained run (folder or checkpoint); "
                        "default: train hMoEup with the workbench's --preset")
    parser.add_argument("--data-bin", default=None, help="default: the run's own")
    parser.add_argument("--preset", default="cpu", help="workbench preset when training")
    parser.add_argument("--split", default="test")
    parser.add_argument("--speed-prefix", type=int, default=32, help="M of the speed figure")
    parser.add_argument("--prefixes", default="16,32,64,128")
    parser.add_argument("--top-k", default="1", help="K' values of the accuracy table")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-sentences", type=int, default=32)
    parser.add_argument("--tokens-per-sample", type=int, default=None)
    parser.add_argument("--context-window", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    run = load(args)
    window = dict(tokens_per_sample=args.tokens_per_sample, context_window=args.context_window,
                  max_sentences=args.max_sentences)
    speed = time_passes(run, args.split, Routing(prefix=args.speed_prefix), repeats=args.repeats,
                        **window)
    curve = routing_curve(run.model, run.dataset(args.split),
                          prefixes=[int(m) for m in args.prefixes.split(",")],
                          top_k=[int(k) for k in args.top_k.split(",")], progress=False,
                          **window)
    env = environment(args.device)
    print(f"{run!r} on the {args.split} split; {env['device']}, {env['precision']}, "
          f"{env['torch_threads']} torch threads, torch {env['torch']}")
    print(f"speed, {speed['routing']} against full scoring, over every token of the "
          f"{speed['documents']} documents longer than the prefix ({speed['tokens']} tokens, "
          f"prefix included): {speed['tokens_per_s_routed']:.0f} vs "
          f"{speed['tokens_per_s_full']:.0f} tokens/s = {speed['ratio']:.2f}x; expert forwards "
          f"per token {speed['forwards_per_token_routed']:.2f} vs "
          f"{speed['forwards_per_token_full']:.2f} (K = {run.num_experts})")
    shown = curve.assign(**{"gap %": 100 * (curve["routed"] / curve["mixture"] - 1)})
    shown.index = [f"M={m}, K'={k}" for m, k in zip(curve["prefix"], curve["top_k"],
                                                    strict=True)]
    print(to_markdown(shown[["documents", "short_documents", "tokens", "mixture", "routed",
                             "gap %", "accuracy", "winner_in_chosen",
                             "forwards_per_doc_token_routed"]]))
    if args.out is not None:
        Path(args.out).write_text(json.dumps({
            "run": repr(run), "split": args.split, **env, "speed": speed,
            "curve": curve.to_dict(orient="records")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
