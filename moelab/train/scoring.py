"""The scores the EM step asks for, and every speed option of computing them, chosen once.

For chunk x with context c and expert z the score is l_z = log p(z | c) + log p(x | z). The EM
step (moelab.train.objectives.em_step) asks for them twice per batch:

- the E-step's: all K experts, dropout off, no gradient (`BatchScores.e_step`);
- the M-step's: all K experts (soft EM) or the chosen one per chunk (hard EM), in the model's
  own mode (dropout on while training), with gradient (`BatchScores.m_step`).

An `ExpertScorer` is built once from the speed options, which are validated there, and answers
both without the EM step knowing which options are on:

- estep_tokens M: the E-step scores the first M targets of each chunk only (approximate);
- estep_dtype: the E-step runs under autocast to bf16/fp16 (approximate); by default it is
  float32 on every device, also inside the M-step's bf16 autocast, since r decides what each
  expert learns;
- reuse_estep: the E-step is read off the M-step's own forward (exact when that forward is the
  E-step's function: no dropout, float32, the whole chunk);
- compiling is one level down, in the model's ScoringFunctions (`MixtureLM.compile_for_speed`),
  since validation and eval-lm score with them too.
"""

from __future__ import annotations

import contextlib
import math

import torch

from moelab.model import MixtureLM
from moelab.train.method import Method

ESTEP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

REUSE_REFUSED = ("reuse_estep needs K > 1, no estep_tokens or estep_dtype, no autocast and a "
                 "model without dropout (dropout, attention_dropout and gating_dropout all 0): "
                 "otherwise the M-step's forward differs from the E-step's")


class ExpertScorer:
    """How the EM step's scores are computed for `model`: the speed options, validated once.

    estep_tokens: responsibilities from the first M targets of each chunk (None: all of them).
    estep_dtype: the E-step under autocast to one of ESTEP_DTYPES (None: float32).
    reuse_estep: score the experts ONCE, with autograd, and take the E-step's scores from those
    detached. True: always (a ValueError where it is not exact); False: never; None (default):
    where exact, for soft EM only (hard EM's backward would then run over all B*K rows, which
    costs more than the one forward of B rows it saves; `moelab bench` measures both).
    """

    def __init__(self, model: MixtureLM, *, estep_tokens: int | None = None,
                 estep_dtype: torch.dtype | None = None, reuse_estep: bool | None = None):
        if estep_tokens is not None and estep_tokens < 1:
            raise ValueError(f"estep_tokens must be >= 1 (or None for the whole chunk), got "
                             f"{estep_tokens}")
        if estep_dtype is not None and estep_dtype not in ESTEP_DTYPES.values():
            raise ValueError(f"estep_dtype must be one of {', '.join(ESTEP_DTYPES)}, got "
                             f"{estep_dtype}")
        if reuse_estep and not self._may_reuse(model, estep_tokens, estep_dtype):
            raise ValueError(REUSE_REFUSED)
        self.model = model
        self.estep_tokens, self.estep_dtype, self.reuse_estep = (estep_tokens, estep_dtype,
                                                                 reuse_estep)

    @staticmethod
    def _may_reuse(model: MixtureLM, estep_tokens: int | None,
                   estep_dtype: torch.dtype | None) -> bool:
        """What reuse needs whatever the mode: several experts and the exact E-step."""
        return model.num_experts > 1 and estep_tokens is None and estep_dtype is None

    def reuse_is_exact(self) -> bool:
        """Whether the M-step's forward, now, computes exactly the E-step's scores: the exact
        E-step, no dropout (or eval mode) and float32 (no autocast around the M-step)."""
        model = self.model
        device = next(model.parameters()).device.type
        return (self._may_reuse(model, self.estep_tokens, self.estep_dtype)
                and (model.dropout_free or not model.training)
                and not torch.is_autocast_enabled(device))

    def reuses_estep(self, *, hard: bool) -> bool:
        """Whether scores(batch, method) called now, for hard or soft EM, reads the E-step off
        the M-step."""
        if self.reuse_estep is None:
            return not hard and self.reuse_is_exact()
        if self.reuse_estep and not self.reuse_is_exact():
            raise ValueError(REUSE_REFUSED)
        return self.reuse_estep

    def scores(self, batch, method: Method) -> BatchScores:
        """The scores of one batch (computed when asked for). A hard method's M-step scores the
        chosen expert only (which decides whether reuse pays); a uniform prior's log p(z|c) is
        -log K, a learned one the gating network's."""
        if not method.uniform_prior and self.model.gating is None:
            raise ValueError("a learned prior (hMoElp/sMoElp) needs ModelConfig(gating=True)")
        return BatchScores(self, batch, uniform_prior=method.uniform_prior,
                           reuse=self.reuses_estep(hard=method.hard))

    def estep_precision(self, device: str) -> contextlib.AbstractContextManager:
        """The E-step's autocast: estep_dtype's, else none (float32) even inside the M-step's.

        Its weight casts are not cached: autocast keeps one cache until the outermost autocast
        exits, so an fp16 E-step inside a bf16 M-step would hand the M-step fp16 weights.
        """
        if self.estep_dtype is not None:
            return torch.autocast(device, dtype=self.estep_dtype, cache_enabled=False)
        return torch.autocast(device, enabled=False)


class BatchScores:
    """One batch's scores l_z = log p(z | c) + log p(x | z), as the EM step asks for them."""

    def __init__(self, scorer: ExpertScorer, batch, *, uniform_prior: bool, reuse: bool):
        self.scorer, self.batch = scorer, batch
        self.uniform_prior, self.reuse = uniform_prior, reuse
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # reuse: the one forward

    def log_prior(self) -> torch.Tensor:
        """log p(z | c) (B, K) in the model's current mode; -log K for a uniform prior."""
        batch, model = self.batch, self.scorer.model
        if self.uniform_prior:
            B, K = batch.tokens.shape[0], model.num_experts
            return torch.full((B, K), -math.log(K), device=batch.tokens.device)
        return model.log_prior(batch.context, batch.context_lengths)

    def e_step(self) -> torch.Tensor:
        """l (B, K) float32 without gradient, dropout off, for the responsibilities softmax(l).

        One expert: zeros, since softmax over one expert is 1 whatever its score (nothing is
        scored). With estep_tokens, l scores the prefix only.
        """
        model, batch = self.scorer.model, self.batch
        if self.reuse:
            prior, ll = self._reused()
            return (prior + ll).detach()
        if model.num_experts == 1:
            return torch.zeros(batch.tokens.shape[0], 1, device=batch.tokens.device)
        tokens, lengths = batch.tokens, batch.lengths
        if self.scorer.estep_tokens is not None:
            m = self.scorer.estep_tokens
            tokens, lengths = tokens[:, :m], lengths.clamp(max=m)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.scorer.estep_precision(batch.tokens.device.type):
                scores = self.log_prior() + model.expert_log_likelihoods(tokens, lengths)
        finally:
            model.train(was_training)
        scores = scores.float()
        assert not scores.requires_grad, "the E-step's scores must not carry gradient"
        return scores

    def m_step(self, experts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(z | c), log p(x | z)) with gradient, in the model's own mode (dropout on
        while training): (B, K) each for all experts, or (B,) each for experts[b] of row b."""
        model, batch = self.scorer.model, self.batch
        if self.reuse:
            prior, ll = self._reused()
            if experts is None:
                return prior, ll
            return (prior.gather(1, experts[:, None]).squeeze(1),
                    ll.gather(1, experts[:, None]).squeeze(1))
        if experts is None:
            prior = self.log_prior()
            return prior, model.expert_log_likelihoods(batch.tokens, batch.lengths)
        ll = model.log_likelihood(batch.tokens, batch.lengths, experts)  # (B,)
        return self.log_prior().gather(1, experts[:, None]).squeeze(1), ll

    def _reused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All K experts' (prior, log-likelihood), with gradient, computed once per batch."""
        if self._kept is None:
            batch = self.batch
            prior = self.log_prior()
            self._kept = prior, self.scorer.model.expert_log_likelihoods(batch.tokens,
                                                                         batch.lengths)
        return self._kept
