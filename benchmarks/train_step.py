"""Training-step speed: moelab's EM step vs a fairseq-style reference, measured in one run.

moelab scores the K experts of the E-step in ONE batched forward (B*K rows) and, on CUDA, runs
under bf16 autocast with fused Adam. The reference does what fairseq's translation_moe does: K
separate fp32 forwards for the E-step (and K more for a soft M-step), plain Adam. Same model,
same batch, same optimizer settings; only the step differs. Prints one JSON line per method:

    python benchmarks/train_step.py                 # tiny preset, CPU
    python benchmarks/train_step.py --device cuda --arch transformer_lm --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from moelab.data import Batch
from moelab.model import MixtureLM
from moelab.train.config import ModelArgs, model_config
from moelab.train.distributed import DistInfo
from moelab.train.objectives import METHODS, PosteriorLogSumExp, method_flags
from moelab.train.trainer import EMStep, autocast_context, train_step


def synthetic_batch(*, batch_size: int, seq_len: int, vocab_size: int, pad_id: int,
                    generator: torch.Generator) -> Batch:
    """Rows of random length in [seq_len/2, seq_len]; every other row has a context."""
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=generator)
    tokens = torch.randint(4, vocab_size, (batch_size, seq_len), generator=generator)
    tokens[torch.arange(seq_len) >= lengths[:, None]] = pad_id
    context_lengths = (torch.arange(batch_size) % 2) * (seq_len // 2)
    context = torch.randint(4, vocab_size, (batch_size, seq_len // 2), generator=generator)
    context[torch.arange(seq_len // 2) >= context_lengths[:, None]] = pad_id
    return Batch(tokens=tokens, lengths=lengths, context=context, context_lengths=context_lengths,
                 doc_ids=torch.arange(batch_size), domain_ids=torch.zeros(batch_size, dtype=int))


def reference_step(model: MixtureLM, batch: Batch, optimizer: torch.optim.Optimizer, *,
                   hard: bool, uniform_prior: bool) -> None:
    """fairseq translation_moe's `_get_loss`: one fp32 forward per expert, then backward."""
    B, K = batch.tokens.shape[0], model.num_experts

    def lprob_yz(winners: torch.Tensor | None = None) -> torch.Tensor:
        if winners is None:  # K sequential forwards
            lprob_y = torch.stack([
                model.log_likelihood(batch.tokens, batch.lengths, torch.full((B,), k))
                for k in range(K)], dim=1)  # (B, K)
        else:
            lprob_y = model.log_likelihood(batch.tokens, batch.lengths, winners)[:, None]
        if uniform_prior:
            return lprob_y - math.log(K)
        lprob_z = model.log_prior(batch.context, batch.context_lengths)  # (B, K)
        if winners is not None:
            lprob_z = lprob_z.gather(1, winners[:, None])
        return lprob_y + lprob_z

    optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        posterior = lprob_yz().softmax(dim=1)  # (B, K)
    model.train()
    if hard:
        loss = -lprob_yz(posterior.argmax(1)).sum()
    else:
        loss = PosteriorLogSumExp.apply(lprob_yz(), posterior).sum()
    (loss / batch.num_tokens).backward()
    optimizer.step()


def _timed_pair(ours, reference, steps: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per step of each, after two warm-up steps.

    The two steps alternate, so a busy machine slows both alike; the median ignores the steps
    that another process interrupted.
    """
    def one(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):
        ours(), reference()
    times = [(one(ours), one(reference)) for _ in range(steps)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def bench(method: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    hard, uniform_prior = method_flags(method)
    margs = ModelArgs(arch=args.arch, method=method,
                      num_experts=1 if method == "dense" else args.num_experts)
    config = model_config(margs, vocab_size=args.vocab_size, pad_id=3,
                          tokens_per_sample=args.seq_len)
    batch = synthetic_batch(batch_size=args.batch_size, seq_len=args.seq_len,
                            vocab_size=args.vocab_size, pad_id=3,
                            generator=torch.Generator().manual_seed(0))
    dist = DistInfo(device=device)

    torch.manual_seed(0)
    model = MixtureLM(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_module = EMStep(model, hard=hard, uniform_prior=uniform_prior)
    autocast = autocast_context(device)
    model.train()

    torch.manual_seed(0)
    ref_model = MixtureLM(config).to(device)
    ref_optimizer = torch.optim.Adam(ref_model.parameters(), lr=1e-4)
    on_device = batch.to(device)
    ours, theirs = _timed_pair(
        lambda: train_step(step_module, [batch], optimizer, dist=dist, clip_norm=0.0,
                           autocast=autocast),
        lambda: reference_step(ref_model, on_device, ref_optimizer, hard=hard,
                               uniform_prior=uniform_prior),
        args.steps, device)
    tokens = batch.num_tokens
    return {"benchmark": "train_step", "method": method, "arch": args.arch,
            "device": str(device), "num_experts": config.num_experts,
            "batch_tokens": tokens, "tokens_per_s": round(tokens / ours, 1),
            "reference_tokens_per_s": round(tokens / theirs, 1),
            "ratio": round(theirs / ours, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    for method in args.methods:
        print(json.dumps(bench(method, args)), flush=True)


if __name__ == "__main__":
    main()
