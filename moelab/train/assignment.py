"""How the E-step's posterior assigns chunks to experts, when a remedy against collapse is on.

Plain EM assigns with r = softmax(l). The remedies reshape that posterior, and only the
posterior the M-step trains on (hard EM's argmax, soft EM's fixed weights); the loss and
evaluation keep the model's own scores l. All of them are off by default.

- annealing (`--estep-temperature T0 --anneal-updates N`): r = softmax(l / T), T going linearly
  from T0 to 1 over the first N updates, then 1 (deterministic annealing EM, Ueda and Nakano
  1998): a hot start keeps every expert in play while the experts are still alike;
- prior bias (`--prior-bias-rate X`): b (K,) added to the log prior to choose, never to the loss,
  raised for idle experts and lowered for busy ones after each update (Wang et al. 2024,
  "Auxiliary-loss-free load balancing"); it is training state and goes into the checkpoint;
- balance (`--balance sinkhorn`): the batch's posterior projected by Sinkhorn-Knopp iterations
  onto a plan whose rows sum to 1 and whose columns (the experts' shares) are equal, as SwAV and
  SeLa balance clusters, iterated until every share is within SINKHORN_TOLERANCE of its target
  (at most SINKHORN_MAX_ITERATIONS times; the train log's `sinkhorn_residual` and
  `sinkhorn_iterations` show how far the plan got); hard EM then gives each chunk one expert,
  the experts' counts equal up to one on each rank (so at most ceil(B / K)), the plan's
  strongest pairs first (a greedy form of the balanced assignment BASE layers solve for tokens):
  the plan's argmax alone would send a batch of alike chunks, whose plan is uniform, all to one
  expert. The plan's shares are per micro-batch, over all ranks together: with --update-freq N
  each of an update's N micro-batches is balanced on its own (the E-step scores one micro-batch
  at a time), so a micro-batch whose chunks all prefer one expert is spread over the experts
  even when the update's other micro-batches prefer the others.

The order is the one the methods need: bias the scores, temper them, then balance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from moelab.errors import MoelabError
from moelab.train.distributed import DistInfo, all_reduce_max, all_reduce_sum

BALANCES = ("none", "sinkhorn")

# The plan is balanced when every expert's share is within 0.1% of B_all / K. SwAV's 3
# iterations are not enough here: sequence scores differ by hundreds of nats, and one iteration
# lowers a column's log share by at most log K, so a batch whose chunks all prefer one expert
# by 50-500 nats kept column sums of [4.0, 0.6, 0.4, ...] against 1.14 (B = 8, K = 7) after 3.
SINKHORN_TOLERANCE = 1e-3
# Measured on such batches (B = 8 to 256, K = 7 to 32, one or two experts ahead by 50-500 nats,
# 20 each): a median of 120-530 iterations, most under 700; 4 of 240 stopped at this cap, at
# residuals of 0.001-0.09. An iteration costs two small all-reduces and a host sync, about
# 0.07 ms on a CPU. The residual in the train log shows a batch trained on a plan left unbalanced.
SINKHORN_MAX_ITERATIONS = 1000


def anneal_temperature(start: float, anneal_updates: int, num_updates: int) -> float:
    """The E-step temperature of update `num_updates` (0-based): linear from `start` to 1 over
    `anneal_updates` updates, then exactly 1 (so the posterior is exactly softmax(l) again)."""
    if num_updates >= anneal_updates:
        return 1.0
    return start + (1.0 - start) * num_updates / anneal_updates


class SinkhornPlan(NamedTuple):
    """A balanced plan and how balanced it is."""

    plan: torch.Tensor  # (B, K) rows sum to 1, columns to B_all / K within `residual`
    residual: float  # max_k |column sum_k / (B_all / K) - 1| over all ranks: 0 is balanced
    iterations: int  # column-and-row scalings run (0: the posterior was already balanced)


def sinkhorn(log_scores: torch.Tensor, *, tolerance: float = SINKHORN_TOLERANCE,
             max_iterations: int = SINKHORN_MAX_ITERATIONS,
             dist: DistInfo | None = None) -> SinkhornPlan:
    """The balanced plan of scores (B, K): rows sum to 1, the experts' columns to B_all / K.

    B_all counts the chunks of every rank, and the column sums are all-reduced, so the shares
    are global: a rank whose chunks all prefer one expert keeps them when another rank's
    prefer the others. Log domain, float64: sequence scores differ by hundreds of nats, so a
    losing expert's posterior underflows in probabilities and its column could not be scaled.
    Each iteration scales the columns to their share, then the rows to 1, so each row is
    exactly a posterior; it stops once the largest relative deviation of a column sum from
    B_all / K (the residual) is below `tolerance`, or after `max_iterations`. The residual comes
    from the all-reduced column sums, so every rank stops at the same iteration. A plan that is
    not finite (scores that are not) is an error, never a silent choice.
    """
    dist = dist or DistInfo()
    x = log_scores.double()  # (B, K)
    K = x.shape[1]
    chunks = all_reduce_sum(torch.tensor([float(x.shape[0])], dtype=torch.float64,
                                         device=x.device), dist)
    log_share = torch.log(chunks / K)  # (1,) log(B_all / K)
    x = x - x.logsumexp(dim=1, keepdim=True)  # rows to 1 (the plan does not change: stability)
    iterations = 0
    while True:
        excess = _column_logsumexp(x, dist) - log_share  # (K,) log(column sum / share), all ranks
        residual = float((excess.exp() - 1).abs().max())  # the one host sync per iteration
        if not math.isfinite(residual):
            raise MoelabError(
                "the balanced (Sinkhorn) plan is not finite: the E-step's scores were not "
                "finite (nan or inf) on some rank; lower --lr, raise --warmup-updates or set "
                "--clip-norm, then rerun to resume from the last checkpoint")
        if residual < tolerance or iterations == max_iterations:
            return SinkhornPlan(x.exp().to(log_scores.dtype), residual, iterations)
        x = x - excess  # (B, K): columns to B_all / K
        x = x - x.logsumexp(dim=1, keepdim=True)  # rows to 1
        iterations += 1


def balanced_assignment(cost: np.ndarray) -> np.ndarray:
    """(N, K) cost -> (N,) column per row, minimising the cost greedily under equal sizes.

    The cheapest (row, column) pairs are taken first (ties: the lower index first), each row
    once, each column up to N // K rows and N % K of them one more: sizes equal up to one.
    Greedy rather than an exact linear assignment, whose N x N cost matrix would not fit for a
    large corpus. Used for hard EM's balanced choice and for the warm start's balanced k-means.
    """
    n, k = cost.shape
    base, extra = n // k, n % k
    sizes = np.zeros(k, dtype=np.int64)
    chosen = np.full(n, -1, dtype=np.int64)
    extras_taken, assigned = 0, 0
    for flat in np.argsort(cost, axis=None, kind="stable"):
        row, c = divmod(int(flat), k)
        if chosen[row] >= 0:
            continue
        if sizes[c] < base or (sizes[c] == base and extras_taken < extra):
            extras_taken += sizes[c] == base
            sizes[c] += 1
            chosen[row] = c
            assigned += 1
            if assigned == n:
                break
    return chosen


def balanced_choice(plan: torch.Tensor) -> torch.Tensor:
    """One expert per chunk (B,) from a plan (B, K), the experts' counts equal up to one (so at
    most ceil(B / K)): the strongest (chunk, expert) pairs of the plan first."""
    cost = -plan.detach().double().cpu().numpy()
    return torch.from_numpy(balanced_assignment(cost)).to(plan.device)


def _column_logsumexp(x: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """log sum_b exp(x_bk) over the chunks of every rank -> (K,)."""
    peak = all_reduce_max(x.max(dim=0).values, dist)  # (K,) the global max, for stability
    total = all_reduce_sum((x - peak).exp().sum(dim=0), dist)  # (K,)
    return peak + total.log()


class PriorBias:
    """The loss-free balancing bias b (K,) on the log prior, used only to choose experts.

    `bias` is updated in place, so the Assignment that chooses with it and the checkpoint
    that saves it (moelab.train.state) see the same tensor.
    """

    def __init__(self, bias: torch.Tensor, rate: float):
        self.bias, self.rate = bias, rate

    def state_dict(self) -> dict:
        """Its checkpoint key: the bias, on the CPU."""
        return {"prior_bias": self.bias.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.bias.copy_(state["prior_bias"])  # in place, in this bias's dtype and device

    def update(self, load: torch.Tensor, dist: DistInfo | None = None) -> None:
        """b_k += rate * sign(mean load - load_k): idle experts rise, busy ones fall.

        `load` (K,) is this rank's; the loads of all ranks are summed first, so every rank
        takes the same step and the biases stay identical.
        """
        load = all_reduce_sum(load.detach().to(self.bias.dtype).clone(), dist or DistInfo())
        self.bias += self.rate * torch.sign(load.mean() - load)

    def spread(self) -> float:
        """max b - min b: how far the bias pushes one expert over another (for the log)."""
        return float(self.bias.max() - self.bias.min())


@dataclass
class Assignment:
    """The remedies in force, and the posterior they turn the E-step's scores into."""

    balance: str = "none"
    prior_bias: PriorBias | None = None
    estep_temperature: float = 1.0  # T0 of the annealing
    anneal_updates: int = 0
    dist: DistInfo = field(default_factory=DistInfo)
    temperature: float = 1.0  # this update's, set by start_update
    hard: bool = False  # hard EM: a balanced plan becomes a capacity-capped choice per chunk
    # the largest Sinkhorn residual and iteration count over the micro-batches since the last
    # log line (None: no plan was made, as during a warm start); log_fields reads and clears them
    sinkhorn_residual: float | None = None
    sinkhorn_iterations: int = 0

    def start_update(self, num_updates: int) -> None:
        """Set the temperature of update `num_updates` (0-based) before its E-steps."""
        self.temperature = anneal_temperature(self.estep_temperature, self.anneal_updates,
                                              num_updates)

    def posterior(self, scores: torch.Tensor) -> torch.Tensor:
        """E-step scores l (B, K) -> the posterior the M-step trains on (B, K), rows sum to 1."""
        if self.prior_bias is not None:  # added to log p(z | c), and so to l, to choose only
            scores = scores + self.prior_bias.bias
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.balance == "sinkhorn":
            plan, residual, iterations = sinkhorn(scores, dist=self.dist)
            self.sinkhorn_residual = max(residual, self.sinkhorn_residual or 0.0)
            self.sinkhorn_iterations = max(iterations, self.sinkhorn_iterations)
            if self.hard:  # the one-hot of the choice: em_step's argmax takes it as it is
                return torch.nn.functional.one_hot(balanced_choice(plan), plan.shape[1]
                                                   ).to(plan.dtype)
            return plan
        return scores.softmax(dim=-1)

    def log_fields(self) -> dict[str, float]:
        """What the remedies do now, for the train log line (read once per line): with a
        balance, the largest residual and iteration count of the plans since the last line
        (every rank has the same; a resumed run counts from its restart)."""
        fields = {}
        if self.anneal_updates > 0:
            fields["estep_temperature"] = self.temperature
        if self.prior_bias is not None:
            fields["prior_bias_spread"] = self.prior_bias.spread()
        if self.sinkhorn_residual is not None:
            fields["sinkhorn_residual"] = self.sinkhorn_residual
            fields["sinkhorn_iterations"] = self.sinkhorn_iterations
            self.sinkhorn_residual, self.sinkhorn_iterations = None, 0
        return fields


def build_assignment(*, balance: str, prior_bias_rate: float, estep_temperature: float,
                     anneal_updates: int, bias: torch.Tensor | None, dist: DistInfo,
                     hard: bool = False) -> Assignment | None:
    """The Assignment of these options, or None when all are off (plain softmax(l), untouched).

    `bias`: the prior bias to continue from (a resumed run's), required with a bias rate.
    """
    if balance == "none" and prior_bias_rate == 0 and anneal_updates == 0:
        return None
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    if prior_bias_rate > 0 and bias is None:
        raise ValueError("a prior bias rate needs the bias to update (zeros for a new run)")
    prior_bias = PriorBias(bias, prior_bias_rate) if prior_bias_rate > 0 else None
    return Assignment(balance=balance, prior_bias=prior_bias,
                      estep_temperature=estep_temperature, anneal_updates=anneal_updates,
                      dist=dist, temperature=anneal_temperature(estep_temperature,
                                                                anneal_updates, 0), hard=hard)


__all__ = ["BALANCES", "SINKHORN_MAX_ITERATIONS", "SINKHORN_TOLERANCE", "Assignment", "PriorBias",
           "SinkhornPlan", "anneal_temperature", "balanced_assignment", "balanced_choice",
           "build_assignment", "sinkhorn"]
