"""Online EM for the sequence-level mixture: the E-step, the hard/soft M-step and their objective.

The trainer reaches the EM in three calls: Trainer.fit -> update.train_step -> EMStep.forward ->
`em_step`, which is the E-step (BatchScores.e_step, then softmax) and the M-step
(BatchScores.m_step, then `em_objective`). Validation scores all experts and calls the same
`em_objective`. The scores, and every option that makes them cheaper, come from
moelab.train.scoring; the method (hard/soft, uniform/learned prior) from moelab.train.method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.train.assignment import Assignment
from moelab.train.method import Method
from moelab.train.scoring import ExpertScorer

__all__ = ["EMOutput", "PosteriorLogSumExp", "em_objective", "em_step"]


@dataclass
class EMOutput:
    loss: torch.Tensor  # scalar, SUM over the batch; the caller divides by num_tokens
    # (B, K) the posterior r the M-step trained on (dropout-free E-step, no grad): softmax(l),
    # or the remedies' reshaped one
    responsibilities: torch.Tensor
    num_tokens: int  # target tokens in the batch
    nll: torch.Tensor  # scalar, no grad: -log p(x|z*) (hard) or the marginal -log p(x|c) (soft)
    # (B, K) the model's own posterior softmax(l), which a remedy reshapes into the above; None
    # when a warm start chose the experts and no E-step ran
    posterior: torch.Tensor | None = None


class PosteriorLogSumExp(torch.autograd.Function):
    """-logsumexp_z l_z per row, whose gradient w.r.t. l_z is -r_z with r GIVEN (not softmax(l)).

    The soft M-step scores the experts with dropout on, but the responsibilities must come from
    the dropout-free E-step; the true gradient -softmax(l) would use the noisy dropout scores.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(posterior)
        return -torch.logsumexp(scores, dim=-1)  # (B, K) -> (B,)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (posterior,) = ctx.saved_tensors
        return -posterior * grad_out[:, None], None  # (B, K); no gradient for r


def em_objective(log_prior: torch.Tensor, log_lik: torch.Tensor, method: Method,
                 r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-batch objective, summed over the batch: (loss, nll without gradient).

    hard: -(log p(z* | c) + log p(x | z*)) of the winner z* = argmax_z r_z, nll -log p(x | z*);
    soft: -log sum_z p(x, z | c), whose gradient weights expert z by the given r_z
    (PosteriorLogSumExp), nll the same marginal. log_prior, log_lik: (B, K) for all experts,
    or (B,) the winner's alone where hard EM scored only it. r (B, K): the posterior, from the
    dropout-free E-step (training) or softmax of the same scores (validation). With a uniform
    prior -log K stays in the loss (docs/design.md section 2): a soft loss is the marginal NLL.
    """
    if method.hard:
        if log_lik.dim() == 2:  # all experts scored: keep the winner's
            z = r.argmax(dim=-1, keepdim=True)  # (B, 1)
            log_prior, log_lik = log_prior.gather(1, z).squeeze(1), log_lik.gather(1, z).squeeze(1)
        return -(log_prior + log_lik).sum(), -log_lik.detach().sum()
    loss = PosteriorLogSumExp.apply(log_prior + log_lik, r).sum()
    return loss, loss.detach()


def em_step(scorer: ExpertScorer, batch, method: Method, *, assignment: Assignment | None = None,
            experts: torch.Tensor | None = None) -> EMOutput:
    """One online-EM step on a batch, as Shen et al. (2019) write it; the caller calls backward.

    (Shen, Ott, Auli, Ranzato: "Mixture Models for Diverse Machine Translation: Tricks of the
    Trade", ICML 2019: hard/soft EM, uniform/learned prior, the expert as the first token.)
    Expert z reads the chunk x after its indicator token <expert_z> (the model's first token);
    its score is l_z = log p(z | c) + log p(x | z), with the prior p(z | c) uniform (1/K) or
    learned from the context c. How the scores are computed (prefix or low-precision E-step,
    the E-step read off the M-step, compiled kernels) is the scorer's business, not the step's:
    ExpertScorer(model) is the exact float32 E-step on the whole chunk.
    `assignment`: the remedies against collapse (balance, prior bias, annealing), which reshape
    the posterior the M-step trains on, never the loss (moelab.train.assignment); None: off.
    `experts` (B,), a warm start's expert per chunk (moelab.train.warm_start), replaces
    the E-step: those experts are trained as if the posterior were one-hot on them.
    """
    scores = scorer.scores(batch, method)
    # E-step: the posterior r_z = p(z | x, c) = softmax_z l_z, from a forward with dropout off
    # and without gradient: a fixed target for the M-step
    posterior = None
    if experts is not None:  # a warm start's clusters choose, not the E-step
        r = F.one_hot(experts, scorer.model.num_experts).float()  # (B, K)
    else:
        log_joint = scores.e_step()  # (B, K) l_z
        posterior = log_joint.softmax(dim=-1)
        r = posterior if assignment is None else assignment.posterior(log_joint)  # (B, K)
    # M-step, dropout on, with gradient: hard EM scores the winner z* = argmax_z r_z alone
    # ((B,) each), soft EM every expert ((B, K) each)
    log_prior, log_lik = scores.m_step(r.argmax(dim=-1) if method.hard else None)
    loss, nll = em_objective(log_prior, log_lik, method, r)
    return EMOutput(loss=loss, responsibilities=r, num_tokens=batch.num_tokens, nll=nll,
                    posterior=posterior)
