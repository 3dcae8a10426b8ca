"""One optimizer update: the EM step as a module DDP can wrap, the optimizer, the M-step's
precision, and `train_step`, which turns `update_freq` batches into one update.

The EM path from the trainer: Trainer.fit -> `train_step` -> `EMStep.forward` ->
moelab.train.objectives.em_step, which reads as the E-step (the scorer's e_step, softmax) and
the M-step (its m_step, em_objective).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from moelab.data import Batch
from moelab.model import MixtureLM
from moelab.train import faults
from moelab.train.assignment import Assignment
from moelab.train.compute import Flops, batch_flops
from moelab.train.config import RunConfig
from moelab.train.distributed import DistInfo, NamedSums, all_reduce_sum
from moelab.train.method import Method
from moelab.train.objectives import em_step
from moelab.train.schedule import learning_rate
from moelab.train.scoring import ExpertScorer


def build_optimizer(model: nn.Module, config: RunConfig, device: torch.device
                    ) -> torch.optim.AdamW:
    """fairseq's `adam`: its weight decay is decoupled (w -= lr * wd * w), which is AdamW's
    update, not torch's Adam (which adds wd * w to the gradient)."""
    o = config.optim
    # fused Adam is one kernel for all parameters on CUDA; CPU has no fused kernel here
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.adam_betas, eps=o.adam_eps,
                            weight_decay=o.weight_decay, fused=device.type == "cuda")


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto -> bfloat16 on CUDA (tensor cores, no loss scaling), float32 elsewhere."""
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return precision


def autocast_context(device: torch.device, precision: str = "auto"
                     ) -> Callable[[], contextlib.AbstractContextManager]:
    """The M-step's context: bf16 autocast for --precision bfloat16, else plain float32.

    The E-step and validation do not run under it: they take their own precision (the
    ExpertScorer's estep_dtype, float32 by default; validation float32, as eval-lm), whatever
    the device.
    """
    if resolve_precision(precision, device) == "bfloat16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def set_learning_rate(optimizer: torch.optim.Optimizer, config: RunConfig,
                      num_updates: int) -> float:
    lr = learning_rate(config.optim, num_updates)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class EMStep(nn.Module):
    """Runs the whole EM step (E-step and M-step) as one forward, so DDP can wrap it.

    The E-step inside em_step scores all experts under no_grad, so it adds nothing to the graph;
    the M-step's graph is the one DDP's reducer expects, and the gradient all-reduce happens in
    backward as usual. Returns a tuple so DDP finds the output tensors. The E-step options are
    checked once, here, by the ExpertScorer they build. `assignment` (the remedies against
    collapse, None when off) is the trainer's own object: it sets its temperature and bias
    between updates.
    """

    def __init__(self, model: MixtureLM, method: Method, *, estep_tokens: int | None = None,
                 estep_dtype: torch.dtype | None = None, assignment: Assignment | None = None):
        super().__init__()
        self.model = model
        self.method = method
        self.scorer = ExpertScorer(model, estep_tokens=estep_tokens, estep_dtype=estep_dtype)
        self.assignment = assignment

    def forward(self, batch: Batch, experts: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`experts` (B,): a warm start's choice per chunk, in place of the E-step."""
        out = em_step(self.scorer, batch, self.method, assignment=self.assignment,
                      experts=experts)
        return out.loss, out.responsibilities, out.nll, out.posterior

    def flops(self, batch: Batch, *, estep: bool = True) -> Flops:
        """The model FLOPs of `forward(batch)` and its backward, as called now (whether the
        E-step is read off the M-step depends on the mode and the autocast in force);
        estep=False: a warm start's experts are given, so no E-step runs."""
        return batch_flops(self.model.config, batch.lengths, batch.tokens.shape[1],
                           method=self.method, estep_tokens=self.scorer.estep_tokens,
                           reuse=self.scorer.reuses_estep(hard=self.method.hard), estep=estep)


def wrap_for_training(model: MixtureLM, dist: DistInfo, method: Method, *,
                      estep_tokens: int | None = None, estep_dtype: torch.dtype | None = None,
                      assignment: Assignment | None = None) -> nn.Module:
    model.train()
    step = EMStep(model, method, estep_tokens=estep_tokens, estep_dtype=estep_dtype,
                  assignment=assignment)
    if not dist.distributed:
        return step
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    # Every parameter gets a gradient each step (a uniform prior builds no gating network), so
    # the reducer needs no unused-parameter search.
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=False)


@dataclass
class UpdateChecks(NamedSums):
    """What every rank tells the others once per update, summed in one all-reduce (NamedSums)."""

    bad: torch.Tensor  # 1 where the loss or gradient norm is not finite
    stop: torch.Tensor  # 1 where a stop (SIGTERM/SIGINT) was requested
    # the update's model FLOPs, by part (compute.Flops)
    estep_flops: torch.Tensor
    mstep_flops: torch.Tensor
    gating_flops: torch.Tensor
    output_flops: torch.Tensor

    @property
    def flops(self) -> Flops:
        return Flops(float(self.estep_flops), float(self.mstep_flops), float(self.gating_flops),
                     float(self.output_flops))


@dataclass
class StepStats:
    loss: torch.Tensor  # summed over tokens (all micro-batches, this rank)
    nll: torch.Tensor
    num_tokens: int  # this rank's targets
    global_tokens: int  # all ranks' targets in the update
    responsibility_sum: torch.Tensor  # (K,) summed over chunks: the posterior trained on
    argmax_counts: torch.Tensor  # (K,)
    num_chunks: int
    grad_norm: torch.Tensor  # before clipping
    # (K,) the model's own posterior softmax(l) summed over the chunks an E-step scored (all but
    # a warm start's), and how many: a remedy reshapes it into responsibility_sum
    posterior_sum: torch.Tensor | None = None
    scored_chunks: int = 0
    flops: Flops = field(default_factory=Flops)  # the update's model FLOPs, all ranks
    skipped: bool = False  # the loss or gradient was not finite: no optimizer step was taken
    stop: bool = False  # some rank was asked to stop (SIGTERM/SIGINT): all stop after this one


def train_step(step_module: nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer,
               *, dist: DistInfo, clip_norm: float, autocast,
               stop_requested: bool = False,
               assign: Callable[[Batch], torch.Tensor] | None = None) -> StepStats:
    """One optimizer update over `update_freq` micro-batches, normalized as fairseq does.

    Each micro-batch backpropagates its SUMMED loss scaled by 1 / (targets in the whole update,
    over all ranks), so the gradient is that of the mean per-token loss of the update, however it
    is split into micro-batches or ranks. DDP averages over ranks, hence the world_size factor.

    A non-finite loss or gradient norm (on any rank) skips the optimizer step and drops the
    gradients, so NaN never reaches the weights or Adam's moments. Deciding that costs one
    device sync per update, before the optimizer step; the same all-reduce tells every rank
    whether any was asked to stop (`stop_requested`), so all stop at the same update.
    `assign` (a warm start's chunk -> expert) replaces the E-step of this update. The update's
    model FLOPs are counted from the batches' shapes on the CPU (no sync) and summed over the
    ranks in that same all-reduce.
    """
    device = dist.device
    tokens = [b.num_tokens for b in micro_batches]  # counted on CPU: no device sync
    global_tokens = int(all_reduce_sum(torch.tensor([sum(tokens)], device=device), dist).item()
                        ) if dist.distributed else sum(tokens)
    scale = dist.world_size / global_tokens
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    r_sum, counts, chunks = None, None, 0
    posterior_sum, scored = None, 0
    module = getattr(step_module, "module", step_module)  # the EMStep inside DDP
    flops = Flops()
    for i, batch in enumerate(micro_batches):
        shapes = batch  # lengths stay on the CPU: counting FLOPs waits for no device
        batch = batch.to(device, non_blocking=True)
        last = i == len(micro_batches) - 1
        # gradients are all-reduced once per update: skip DDP's sync on all but the last
        sync = contextlib.nullcontext() if last or not dist.distributed else step_module.no_sync()
        with sync:
            with autocast():
                flops = flops + module.flops(shapes, estep=assign is None)
                loss, r, nll, posterior = step_module(batch,
                                                      None if assign is None else assign(batch))
            (loss * scale).backward()
        loss_sum += loss.detach().float()
        nll_sum += nll.float()
        r_sum = r.sum(0) if r_sum is None else r_sum + r.sum(0)  # (K,)
        won = torch.bincount(r.argmax(-1), minlength=r.shape[1])  # (K,)
        counts = won if counts is None else counts + won
        chunks += r.shape[0]
        if posterior is not None:
            posterior_sum = (posterior.sum(0) if posterior_sum is None
                             else posterior_sum + posterior.sum(0))
            scored += posterior.shape[0]
    params = [p for p in optimizer.param_groups[0]["params"] if p.grad is not None]
    max_norm = clip_norm if clip_norm > 0 else math.inf  # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).double()
    stop, estep, mstep, gating, output = torch.tensor(  # known on the CPU: one copy
        [float(stop_requested), flops.estep, flops.mstep, flops.gating, flops.output],
        dtype=torch.float64, device=device)
    local = UpdateChecks(bad=bad, stop=stop, estep_flops=estep, mstep_flops=mstep,
                         gating_flops=gating, output_flops=output)
    total = UpdateChecks.from_tensor(all_reduce_sum(local.tensor, dist).cpu())  # the one sync
    skipped = float(total.bad) > 0  # the same decision on every rank
    faults.hit("step")
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return StepStats(loss=loss_sum, nll=nll_sum, num_tokens=sum(tokens),
                     global_tokens=global_tokens, responsibility_sum=r_sum,
                     argmax_counts=counts, num_chunks=chunks, grad_norm=grad_norm.detach(),
                     posterior_sum=posterior_sum, scored_chunks=scored,
                     flops=total.flops, skipped=skipped, stop=float(total.stop) > 0)
