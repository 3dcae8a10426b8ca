"""MixtureLM: one shared Transformer, K expert tokens, batched K-expert scoring and the prior."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from moelab.model.compile import CompiledOrEager
from moelab.model.gating import MeanPoolGating
from moelab.model.log_probs import KERNELS, target_log_probs
from moelab.model.transformer import KVCache, ModelConfig, Transformer


@dataclass(frozen=True)
class ScoringFunctions:
    """The two functions that turn a mixture's inputs into log-probabilities (`token_log_probs`).

    body: input ids (B, T) -> hidden states (B, T, C), the Transformer's forward without the
    output projection (`Transformer.hidden`, a compiled version of it, or another attention).
    kernels: the chunked log-probability kernels of moelab.model.log_probs (KERNELS, or compiled
    versions).
    Any replacement computes the same function; only its speed differs. Every scoring call of
    the model uses them: the E-step, the M-step, validation and eval-lm alike.
    """

    body: Callable[[torch.Tensor], torch.Tensor]
    kernels: tuple[Callable, Callable, Callable] = KERNELS


class MixtureLM(nn.Module):
    """A sequence-level mixture of K experts sharing one Transformer (docs/design.md section 1).

    Expert z reads the chunk x_1..x_n as the input [<expert_z>, x_1, ..., x_{n-1}] with targets
    x_1..x_n; the expert token takes the place of a begin-of-sequence token.

    The output distribution covers the real vocabulary only: expert tokens and the input-only
    ids (unk, bos, pad) are never targets, so they are not output classes. With tied embeddings
    this is what keeps hard EM honest: a non-chosen expert's row gets no gradient at all.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        # The gating network pools the LM's own token embeddings of the context, so the prior
        # and the LM share one vocabulary representation (and the prior trains it too).
        self.gating = (
            MeanPoolGating(config.n_embd, config.gating_dim, config.num_experts,
                           config.gating_dropout)
            if config.gating else None
        )
        # the ScoringFunctions in use; None: the eager ones (see `scoring`, `use_scoring`)
        self._scoring: ScoringFunctions | None = None
        # ids of the real vocabulary left out of the output softmax (a buffer: it follows .to())
        self.register_buffer("non_targets", torch.tensor(config.non_target_ids, dtype=torch.long),
                             persistent=False)

    def compile_for_speed(self, **compile_kwargs) -> bool:
        """torch.compile the Transformer body and the chunked loss kernels, in place.

        Parameters and state_dict are unchanged. A failure to compile (now or at the first
        call) warns once and runs eagerly. Returns False if compiling failed right away.
        """
        body = CompiledOrEager(self.transformer.hidden, **compile_kwargs)
        kernels = tuple(CompiledOrEager(k, **compile_kwargs) for k in KERNELS)
        self.use_scoring(ScoringFunctions(body, kernels))
        return body.active

    @property
    def scoring(self) -> ScoringFunctions:
        """The body and loss kernels every scoring call uses: the eager ones unless
        `compile_for_speed` or `use_scoring` replaced them (`.body.active` and `.body.error`
        tell whether a compiled body is running)."""
        return self._scoring or ScoringFunctions(self.transformer.hidden)

    def use_scoring(self, scoring: ScoringFunctions | None) -> None:
        """Score with these functions from now on (None: the eager ones again).

        They must compute what the eager ones compute: parameters and state_dict are not
        touched, so a checkpoint does not record them.
        """
        self._scoring = scoring

    @contextlib.contextmanager
    def scoring_with(self, scoring: ScoringFunctions) -> Iterator[MixtureLM]:
        """`use_scoring(scoring)` inside the block, the functions before it afterwards
        (`moelab bench` times one variant against another this way)."""
        before = self._scoring
        self._scoring = scoring
        try:
            yield self
        finally:
            self._scoring = before

    @property
    def dropout_free(self) -> bool:
        """True when no dropout is configured, so training and eval mode compute the same."""
        c = self.config
        return c.dropout == 0 and c.attention_dropout == 0 and (
            not c.gating or c.gating_dropout == 0)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def expert_token_id(self, k: int) -> int:
        if not 0 <= k < self.config.num_experts:
            raise ValueError(f"expert index {k} out of range [0, {self.config.num_experts})")
        return self.config.vocab_size + k

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection's rows of the real vocabulary (vocab_size, C): no expert rows."""
        return self.transformer.lm_head.weight[: self.config.vocab_size]

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits over the real vocabulary (..., vocab_size), with -inf
        at the ids that are never targets: log_softmax of it is the model's distribution."""
        logits = hidden @ self.output_weight.t()  # (..., V)
        return logits.index_fill(-1, self.non_targets, -math.inf)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) with the expert token at position 0 -> logits (B, T, vocab_size).

        With a KVCache (generation), input_ids continue the cached sequence instead.
        """
        return self.output_logits(self.transformer.hidden(input_ids, cache))  # (B, T, V)

    def next_token_logits(self, input_ids: torch.Tensor, cache: KVCache | None = None
                          ) -> torch.Tensor:
        """Logits of the LAST position only (B, vocab_size): what generation samples from.

        Projecting every position onto the vocabulary and keeping one would cost T times the
        output projection (most of a small model's work) for each new token without a cache.
        """
        return self.output_logits(self.transformer.hidden(input_ids, cache)[:, -1])  # (B, V)

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding (moelab.generate)."""
        return self.transformer.new_cache()

    def token_log_probs(self, tokens: torch.Tensor, lengths: torch.Tensor,
                        experts: torch.Tensor) -> torch.Tensor:
        """log p(x_t | x_<t, z) per target, float32 (B, T); 0 at padding. Row b uses experts[b]."""
        B, T = tokens.shape
        expert_ids = self.config.vocab_size + experts.to(tokens.device)  # (B,)
        input_ids = torch.cat([expert_ids[:, None], tokens[:, :-1]], dim=1)  # (B, T)
        scoring = self.scoring
        hidden = scoring.body(input_ids)  # (B, T, C)
        mask = torch.arange(T, device=tokens.device) < lengths.to(tokens.device)[:, None]
        # Only real targets are projected onto the vocabulary (the projection and its float32
        # log-softmax are most of the cost), a chunk of rows at a time: no (B, T, V+K) logits.
        logp = target_log_probs(hidden[mask], self.output_weight, tokens[mask],
                                excluded=self.non_targets,
                                kernels=scoring.kernels)  # (N,)
        return torch.zeros(B, T, dtype=logp.dtype, device=logp.device).masked_scatter(
            mask, logp)  # (B, T)

    def log_likelihood(self, tokens: torch.Tensor, lengths: torch.Tensor,
                       experts: torch.Tensor) -> torch.Tensor:
        """log p(x | z = experts[b]) for each row b, float32 (B,)."""
        return self.token_log_probs(tokens, lengths, experts).sum(dim=1)  # (B,)

    def expert_log_likelihoods(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log p(x | z) for every expert z in ONE batched forward of B*K rows -> (B, K) float32."""
        B, K = tokens.shape[0], self.config.num_experts
        rows = tokens.repeat_interleave(K, dim=0)  # (B*K, T): row b*K + k is chunk b, expert k
        experts = torch.arange(K, device=tokens.device).repeat(B)  # (B*K,)
        ll = self.log_likelihood(rows, lengths.repeat_interleave(K, dim=0), experts)  # (B*K,)
        return ll.view(B, K)  # (B, K)

    def log_prior(self, context: torch.Tensor, context_lengths: torch.Tensor) -> torch.Tensor:
        """log p(z | c) (B, K) float32 from the context only; -log K everywhere without gating."""
        B, K = context.shape[0], self.config.num_experts
        if self.gating is None:
            return torch.full((B, K), -math.log(K), device=context.device)  # (B, K)
        reps = self.transformer.tok_emb(context)  # (B, C, n_embd)
        return self.gating(reps, context_lengths.to(context.device))  # (B, K)

    @torch.no_grad()
    def start_log_prior(self) -> torch.Tensor:
        """log pi_z at a document's start (empty context), (K,) float64 on the CPU: -log K, or
        the gating network's own prior. Evaluation, validation and generation all weigh a
        whole document's experts by it."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            empty = torch.zeros(1, 0, dtype=torch.long, device=device)
            zero = torch.zeros(1, dtype=torch.long, device=device)
            return self.log_prior(empty, zero)[0].double().cpu()  # (K,)
        finally:
            self.train(was_training)
