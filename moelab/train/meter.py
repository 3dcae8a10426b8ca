"""The training log's sums over one log interval, and the quantities a log line reports."""

from __future__ import annotations

import math
import time

import torch

from moelab.train.update import StepStats


class Meter:
    """Sums over one log interval, kept on the device: logging adds no wait for the GPU (the
    NaN check in train_step is the one sync per update)."""

    def __init__(self, num_experts: int, device: torch.device):
        self.num_experts, self.device = num_experts, device
        self.elapsed_before = 0.0  # seconds a restored interval had run before the checkpoint
        self.reset()

    def reset(self) -> None:
        K = self.num_experts
        # loss, nll, tokens, chunks, grad_norm sum, r_sum (K), argmax counts (K), the model's
        # posterior sum (K), chunks it was scored on
        self.sums = torch.zeros(6 + 3 * K, dtype=torch.float64, device=self.device)
        self.updates = 0
        self.global_tokens = 0
        self.since = time.perf_counter()  # when this interval's clock started

    def start_clock(self, elapsed: float = 0.0) -> None:
        """Time the interval from now, counting `elapsed` seconds already spent on its sums."""
        self.since = time.perf_counter() - elapsed

    def add(self, s: StepStats) -> None:
        K = self.num_experts
        self.sums[0] += s.loss.double()
        self.sums[1] += s.nll.double()
        self.sums[2] += s.num_tokens
        self.sums[3] += s.num_chunks
        self.sums[4] += s.grad_norm.double()
        self.sums[5 : 5 + K] += s.responsibility_sum.double()
        self.sums[5 + K : 5 + 2 * K] += s.argmax_counts.double()
        if s.posterior_sum is not None:
            self.sums[5 + 2 * K : 5 + 3 * K] += s.posterior_sum.double()
            self.sums[5 + 3 * K] += s.scored_chunks
        self.updates += 1
        self.global_tokens += s.global_tokens

    def state_dict(self) -> dict:
        """The current interval's sums and the seconds they took: a resumed run logs the same
        line as an unbroken one, and its tokens/s is not inflated by tokens counted before."""
        return {"sums": self.sums.cpu(), "updates": self.updates,
                "global_tokens": self.global_tokens,
                "elapsed": time.perf_counter() - self.since}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints from before the model's posterior was summed hold the first 5 + 2K sums
        self.sums.zero_()
        self.sums[: len(state["sums"])] = state["sums"]
        self.updates, self.global_tokens = int(state["updates"]), int(state["global_tokens"])
        self.elapsed_before = float(state.get("elapsed", 0.0))


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())
