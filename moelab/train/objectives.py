"""Online EM for the sequence-level mixture: method names, the E-step and the hard/soft M-step.

The EM step is `em_step`; the scores it reads, and every option that makes them cheaper, come
from moelab.train.scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.model import MixtureLM
from moelab.train.assignment import Assignment
from moelab.train.scoring import ESTEP_DTYPES, ExpertScorer

__all__ = ["ESTEP_DTYPES", "METHODS", "EMOutput", "ExpertScorer", "PosteriorLogSumExp",
           "em_loss", "em_step", "method_flags"]

METHODS = ("dense", "hMoEup", "hMoElp", "sMoEup", "sMoElp")


def method_flags(name: str) -> tuple[bool, bool]:
    """Method name -> (hard, uniform_prior). `dense` is a K=1 plain LM, trained as hard/uniform."""
    flags = {
        "dense": (True, True),
        "hMoEup": (True, True),
        "hMoElp": (True, False),
        "sMoEup": (False, True),
        "sMoElp": (False, False),
    }
    if name not in flags:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return flags[name]


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


def em_step(scorer: ExpertScorer, batch, *, hard: bool, uniform_prior: bool,
            assignment: Assignment | None = None, experts: torch.Tensor | None = None
            ) -> EMOutput:
    """One online-EM step on a batch, as Shen et al. (2019) write it; the caller calls backward.

    (Shen, Ott, Auli, Ranzato: "Mixture Models for Diverse Machine Translation: Tricks of the
    Trade", ICML 2019: hard/soft EM, uniform/learned prior, the expert as the first token.)
    Expert z reads the chunk x after its indicator token <expert_z> (the model's first token);
    its score is l_z = log p(z | c) + log p(x | z), with the prior p(z | c) uniform (1/K) or
    learned from the context c. How the scores are computed (prefix or low-precision E-step,
    the E-step read off the M-step, compiled kernels) is the scorer's business, not the step's.
    `assignment`: the remedies against collapse (balance, prior bias, annealing), which reshape
    the posterior the M-step trains on, never the loss (moelab.train.assignment); None: off.
    `experts` (B,), a warm start's expert per chunk (moelab.train.warm_start), replaces
    the E-step: those experts are trained as if the posterior were one-hot on them.
    """
    scores = scorer.scores(batch, hard=hard, uniform_prior=uniform_prior)
    # E-step: the posterior r_z = p(z | x, c) = softmax_z l_z, from a forward with dropout off
    # and without gradient: a fixed target for the M-step
    posterior = None
    if experts is not None:  # a warm start's clusters choose, not the E-step
        r = F.one_hot(experts, scorer.model.num_experts).float()  # (B, K)
    else:
        log_joint = scores.e_step()  # (B, K) l_z
        posterior = log_joint.softmax(dim=-1)
        r = posterior if assignment is None else assignment.posterior(log_joint)  # (B, K)
    if hard:  # M-step of hard EM: train the winner z* = argmax_z r_z alone on -log p(x, z* | c)
        z = r.argmax(dim=-1)  # (B,)
        log_prior, log_lik = scores.m_step(z)  # (B,) each, dropout on, with gradient
        # with a uniform prior, -log K stays in the loss: README, "Why -log K stays in the loss"
        loss = -(log_prior + log_lik).sum()
        nll = -log_lik.detach().sum()  # -log p(x | z*)
    else:  # M-step of soft EM: -log sum_z p(x, z | c), its gradient weighted by the E-step's r
        log_prior, log_lik = scores.m_step()  # (B, K) each, dropout on, with gradient
        loss = PosteriorLogSumExp.apply(log_prior + log_lik, r).sum()
        nll = loss.detach()  # the marginal -log p(x | c)
    return EMOutput(loss=loss, responsibilities=r, num_tokens=batch.num_tokens, nll=nll,
                    posterior=posterior)


def em_loss(model: MixtureLM, batch, *, hard: bool, uniform_prior: bool,
            scorer: ExpertScorer | None = None, assignment: Assignment | None = None,
            experts: torch.Tensor | None = None) -> EMOutput:
    """`em_step` on `model`, scored by `scorer` (default: ExpertScorer(model), the exact
    float32 E-step on the whole chunk, read off the M-step where exact and it pays)."""
    if scorer is None:
        scorer = ExpertScorer(model)
    elif scorer.model is not model:
        raise ValueError("the scorer scores another model than the one passed to em_loss")
    return em_step(scorer, batch, hard=hard, uniform_prior=uniform_prior, assignment=assignment,
                   experts=experts)
