"""Online EM for the sequence-level mixture: method names, the E-step and the hard/soft M-step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moelab.model import MixtureLM

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
    responsibilities: torch.Tensor  # (B, K) posterior r from the dropout-free E-step, no grad
    num_tokens: int  # target tokens in the batch
    nll: torch.Tensor  # scalar, no grad: -log p(x|z*) (hard) or the marginal -log p(x|c) (soft)


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


def em_loss(model: MixtureLM, batch, *, hard: bool, uniform_prior: bool) -> EMOutput:
    """One online-EM step's loss on a Batch (DESIGN.md section 2); the caller calls backward."""
    B, K = batch.tokens.shape[0], model.num_experts
    if not uniform_prior and model.gating is None:
        raise ValueError("a learned prior (hMoElp/sMoElp) needs ModelConfig(gating=True)")

    def log_prior() -> torch.Tensor:  # (B, K); -log K is part of the loss, not dropped
        if uniform_prior:
            return torch.full((B, K), -math.log(K), device=batch.tokens.device)
        return model.log_prior(batch.context, batch.context_lengths)

    # E-step: dropout off and no autograd, so r is a fixed target for the M-step.
    if K == 1:
        r = torch.ones(B, 1, device=batch.tokens.device)  # one expert: posterior is 1
    else:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                scores = log_prior() + model.expert_log_likelihoods(batch.tokens, batch.lengths)
                r = scores.softmax(dim=-1)  # (B, K)
        finally:
            model.train(was_training)
    assert not r.requires_grad, "responsibilities must not carry gradient"

    # M-step in the model's own mode (dropout on while training).
    if hard:
        z = r.argmax(dim=-1)  # (B,)
        ll = model.log_likelihood(batch.tokens, batch.lengths, z)  # (B,): only the chosen expert
        prior = log_prior().gather(1, z[:, None]).squeeze(1)  # (B,)
        loss = -(prior + ll).sum()
        nll = -ll.detach().sum()
    else:
        scores = log_prior() + model.expert_log_likelihoods(batch.tokens, batch.lengths)  # (B, K)
        loss = PosteriorLogSumExp.apply(scores, r).sum()
        nll = loss.detach()
    return EMOutput(loss=loss, responsibilities=r, num_tokens=batch.num_tokens, nll=nll)
