"""The model FLOPs of one update of each method at the study presets, and their agreement with
torch's FLOP counter on a real update.

    python benchmarks/flops.py --presets cpu,gpu --out benchmarks/results/flops.json

Per preset (moelab.presets.STUDIES: its model, K, tokens-per-sample and max-tokens; the
vocabulary it preprocesses the bundled corpus to) and method: moelab.train.compute's count of an
update on a full batch (max_tokens // T chunks of T tokens), by part, and its ratio to dense's,
for the step as training runs it (soft EM without dropout reads its E-step off the M-step).
Then one real update of a smaller batch (two chunks, one of them padded, each with a context),
forward and backward under `torch.utils.flop_counter.FlopCounterMode` (SDPA's math backend, whose
matmuls the counter sees), against the count of the same update: the relative difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moelab.data import Batch
from moelab.model import MixtureLM
from moelab.presets import STUDIES
from moelab.train.compute import batch_flops
from moelab.train.config import ModelArgs, model_config
from moelab.train.method import METHODS, Method
from moelab.train.update import EMStep


def preset_config(preset: str, method: str):
    study = STUDIES[preset]
    args = {k: v for k, v in study.train.items() if k in ModelArgs.__dataclass_fields__}
    margs = ModelArgs(**{**args, "method": method,
                         "num_experts": None if method == "dense" else study.num_experts})
    T = study.train["tokens_per_sample"]
    return model_config(margs, vocab_size=study.data["vocab_size"], pad_id=3,
                        tokens_per_sample=T), T, study.train["max_tokens"] // T


def counted_update(config, T: int, method: str) -> tuple[float, float]:
    """(torch's count, moelab's count) of one real update of two chunks."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([T, 3 * T // 4])
    tokens = torch.randint(4, config.vocab_size, (2, T), generator=g)
    tokens[torch.arange(T) >= lengths[:, None]] = 3
    context = torch.randint(4, config.vocab_size, (2, T // 2), generator=g)
    batch = Batch(tokens=tokens, lengths=lengths, context=context,
                  context_lengths=torch.tensor([T // 2, T // 4]), doc_ids=torch.arange(2),
                  domain_ids=torch.zeros(2, dtype=torch.long))
    torch.manual_seed(0)
    model = MixtureLM(config).train()
    step = EMStep(model, Method.parse(method))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, *_ = step(batch)
        loss.backward()
    return float(counter.get_total_flops()), step.flops(batch).total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="cpu,gpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for preset in args.presets.split(","):
        dense = None
        for method in METHODS:
            config, T, rows = preset_config(preset, method)
            m = Method.parse(method)
            # the step as training runs it: soft EM without dropout reads its E-step off the
            # M-step's forward (moelab.train.scoring), which the count follows
            step = EMStep(MixtureLM(config).train(), m)
            flops = batch_flops(config, [T] * rows, T, method=m,
                                reuse=step.scorer.reuses_estep(hard=m.hard))
            dense = dense or flops.total
            counter, ours = counted_update(config, T, method)
            row = {"preset": preset, "method": method, "K": config.num_experts,
                   "dropout": config.dropout,
                   "reused_estep": step.scorer.reuses_estep(hard=m.hard),
                   "batch": f"{rows} x {T}", "update_flops": flops.total,
                   "by_part": flops.as_dict(), "x_dense": flops.total / dense,
                   "counter_check": {"torch": counter, "moelab": ours,
                                     "relative_difference": abs(counter - ours) / counter}}
            results.append(row)
            print(f"{preset:4} {method:7} K={config.num_experts:<3} {flops.total:.4e} FLOPs/update "
                  f"({flops.total / dense:.2f}x dense; E-step {flops.estep:.3e}, M-step "
                  f"{flops.mstep:.3e}, gating {flops.gating:.3e}, output {flops.output:.3e}); "
                  f"torch's counter on a real 2-chunk update: {counter:.6e} against "
                  f"{ours:.6e} (relative difference {abs(counter - ours) / counter:.1e})",
                  flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "rows": results},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
