"""The training log's sums over one log interval, and the quantities a log line reports."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from moelab.train.distributed import PER_EXPERT, NamedSums
from moelab.train.update import StepStats


@dataclass
class TrainSums(NamedSums):
    """One log interval's sums, float64 on the device; one tensor underneath (NamedSums), in
    this order, which is also the layout of a checkpoint's "meter" sums."""

    loss: torch.Tensor  # the objective, summed over target tokens
    nll: torch.Tensor
    tokens: torch.Tensor  # target tokens
    chunks: torch.Tensor
    grad_norm: torch.Tensor  # summed over updates, before clipping
    responsibility_sum: torch.Tensor = field(metadata=PER_EXPERT)  # (K,) the posterior trained on
    argmax_counts: torch.Tensor = field(metadata=PER_EXPERT)  # (K,) chunks won
    # (K,) the model's own posterior softmax(l), over the chunks an E-step scored, and how many
    # (checkpoints from before it was summed hold the fields above alone)
    posterior_sum: torch.Tensor = field(metadata=PER_EXPERT)
    scored_chunks: torch.Tensor


class Meter:
    """Sums over one log interval, kept on the device: logging adds no wait for the GPU (the
    NaN check in train_step is the one sync per update)."""

    def __init__(self, num_experts: int, device: torch.device):
        self.num_experts, self.device = num_experts, device
        self.elapsed_before = 0.0  # seconds a restored interval had run before the checkpoint
        self.reset()

    def reset(self) -> None:
        self.sums = TrainSums.zeros(self.num_experts, self.device)
        self.updates = 0
        self.global_tokens = 0
        self.since = time.perf_counter()  # when this interval's clock started

    def start_clock(self, elapsed: float = 0.0) -> None:
        """Time the interval from now, counting `elapsed` seconds already spent on its sums."""
        self.since = time.perf_counter() - elapsed

    def add(self, s: StepStats) -> None:
        sums = self.sums
        sums.loss += s.loss.double()
        sums.nll += s.nll.double()
        sums.tokens += s.num_tokens
        sums.chunks += s.num_chunks
        sums.grad_norm += s.grad_norm.double()
        sums.responsibility_sum += s.responsibility_sum.double()
        sums.argmax_counts += s.argmax_counts.double()
        if s.posterior_sum is not None:
            sums.posterior_sum += s.posterior_sum.double()
            sums.scored_chunks += s.scored_chunks
        self.updates += 1
        self.global_tokens += s.global_tokens

    def state_dict(self) -> dict:
        """The current interval's sums and the seconds they took: a resumed run logs the same
        line as an unbroken one, and its tokens/s is not inflated by tokens counted before."""
        return {"sums": self.sums.tensor.cpu(), "updates": self.updates,
                "global_tokens": self.global_tokens,
                "elapsed": time.perf_counter() - self.since}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints from before the model's posterior was summed hold the first 5 + 2K sums
        flat = torch.zeros(TrainSums.size(self.num_experts), dtype=torch.float64,
                           device=self.device)
        flat[: len(state["sums"])] = state["sums"]
        self.sums = TrainSums.from_tensor(flat)
        self.updates, self.global_tokens = int(state["updates"]), int(state["global_tokens"])
        self.elapsed_before = float(state.get("elapsed", 0.0))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())
