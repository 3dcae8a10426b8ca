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


ESTEP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def can_reuse_estep(model: MixtureLM, *, estep_tokens: int | None = None,
                    estep_dtype: torch.dtype | None = None) -> bool:
    """Whether the M-step's forward computes exactly the E-step's scores (see em_loss): no
    dropout, the whole chunk, and the E-step's float32 (no autocast around the M-step)."""
    device = next(model.parameters()).device.type
    return (model.num_experts > 1 and estep_tokens is None and estep_dtype is None
            and (model.dropout_free or not model.training)
            and not torch.is_autocast_enabled(device))


def reuses_estep(model: MixtureLM, *, hard: bool, estep_tokens: int | None = None,
                 estep_dtype: torch.dtype | None = None) -> bool:
    """em_loss's default: reuse where exact, for soft EM only (hard EM would pay more)."""
    return not hard and can_reuse_estep(model, estep_tokens=estep_tokens,
                                        estep_dtype=estep_dtype)


def em_loss(model: MixtureLM, batch, *, hard: bool, uniform_prior: bool,
            estep_tokens: int | None = None, reuse_estep: bool | None = None,
            estep_dtype: torch.dtype | None = None) -> EMOutput:
    """One online-EM step's loss on a Batch (DESIGN.md section 2); the caller calls backward.

    estep_tokens M: responsibilities from the first M targets of each chunk only (a cheaper,
    approximate E-step); the M-step still scores the whole chunk.
    reuse_estep: score the experts ONCE, with autograd, and take r from those scores detached.
    Exact only when the model has no dropout (then E-step and M-step forwards are the same
    function), so it is refused otherwise. None (default): on for soft EM where exact (saves K
    forwards of B rows), off for hard EM (backward would then run over all B*K rows, which costs
    more than the one forward of B rows it saves; `moelab bench` measures both).
    estep_dtype: run the E-step (responsibilities only) under autocast to this dtype, e.g.
    bf16 on a CPU with AMX where training stays float32; the winning expert may then change on
    a few chunks (benchmarks/estep_precision.py measures how many). Never reused by the M-step.
    None (default): float32 on every device, even inside the M-step's bf16 autocast.
    """
    B, K = batch.tokens.shape[0], model.num_experts
    if not uniform_prior and model.gating is None:
        raise ValueError("a learned prior (hMoElp/sMoElp) needs ModelConfig(gating=True)")
    if estep_tokens is not None and estep_tokens < 1:
        raise ValueError(f"estep_tokens must be >= 1 (or None for the whole chunk), got "
                         f"{estep_tokens}")
    if estep_dtype is not None and estep_dtype not in ESTEP_DTYPES.values():
        raise ValueError(f"estep_dtype must be one of {', '.join(ESTEP_DTYPES)}, got "
                         f"{estep_dtype}")
    if reuse_estep is None:
        reuse_estep = reuses_estep(model, hard=hard, estep_tokens=estep_tokens,
                                   estep_dtype=estep_dtype)
    elif reuse_estep and not can_reuse_estep(model, estep_tokens=estep_tokens,
                                             estep_dtype=estep_dtype):
        raise ValueError("reuse_estep needs K > 1, no estep_tokens or estep_dtype, no autocast "
                         "and a model without dropout "
                         "(dropout, attention_dropout and gating_dropout all 0): otherwise the "
                         "M-step's forward differs from the E-step's")

    def log_prior() -> torch.Tensor:  # (B, K); -log K is part of the loss, not dropped
        if uniform_prior:
            return torch.full((B, K), -math.log(K), device=batch.tokens.device)
        return model.log_prior(batch.context, batch.context_lengths)

    if reuse_estep:  # one forward serves both steps; r is read off it without gradient
        prior, ll = log_prior(), model.expert_log_likelihoods(batch.tokens, batch.lengths)
        scores = prior + ll  # (B, K), with grad
        r = scores.detach().softmax(dim=-1)  # (B, K)
    elif K == 1:
        r = torch.ones(B, 1, device=batch.tokens.device)  # one expert: posterior is 1
    else:
        # E-step: dropout off and no autograd, so r is a fixed target for the M-step.
        tokens, lengths = batch.tokens, batch.lengths
        if estep_tokens is not None:
            tokens, lengths = tokens[:, :estep_tokens], lengths.clamp(max=estep_tokens)
        was_training = model.training
        model.eval()
        try:
            # the E-step's precision is estep_dtype's alone: float32 by default, also when the
            # M-step runs under bf16 autocast (CUDA), since r decides what each expert learns
            device = batch.tokens.device.type
            cast = (torch.autocast(device, dtype=estep_dtype) if estep_dtype is not None
                    else torch.autocast(device, enabled=False))
            with torch.no_grad(), cast:
                scores = log_prior() + model.expert_log_likelihoods(tokens, lengths)
            r = scores.float().softmax(-1)
        finally:
            model.train(was_training)
    assert not r.requires_grad, "responsibilities must not carry gradient"

    # M-step in the model's own mode (dropout on while training).
    if hard:
        z = r.argmax(dim=-1)  # (B,)
        if reuse_estep:
            ll = ll.gather(1, z[:, None]).squeeze(1)  # (B,)
            prior = prior.gather(1, z[:, None]).squeeze(1)  # (B,)
        else:
            ll = model.log_likelihood(batch.tokens, batch.lengths, z)  # (B,): the chosen expert
            prior = log_prior().gather(1, z[:, None]).squeeze(1)  # (B,)
        loss = -(prior + ll).sum()
        nll = -ll.detach().sum()
    else:
        if not reuse_estep:
            scores = log_prior() + model.expert_log_likelihoods(batch.tokens, batch.lengths)
        loss = PosteriorLogSumExp.apply(scores, r).sum()  # scores (B, K) -> scalar
        nll = loss.detach()
    return EMOutput(loss=loss, responsibilities=r, num_tokens=batch.num_tokens, nll=nll)
