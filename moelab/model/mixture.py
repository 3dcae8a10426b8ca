"""MixtureLM: one shared Transformer, K expert tokens, batched K-expert scoring and the prior."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.model.gating import MeanPoolGating
from moelab.model.transformer import KVCache, ModelConfig, Transformer


class MixtureLM(nn.Module):
    """A sequence-level mixture of K experts sharing one Transformer (DESIGN.md section 2).

    Expert z reads the chunk x_1..x_n as the input [<expert_z>, x_1, ..., x_{n-1}] with targets
    x_1..x_n; the expert token takes the place of a begin-of-sequence token.
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

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def expert_token_id(self, k: int) -> int:
        if not 0 <= k < self.config.num_experts:
            raise ValueError(f"expert index {k} out of range [0, {self.config.num_experts})")
        return self.config.vocab_size + k

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) with the expert token at position 0 -> logits (B, T, vocab_size+K).

        With a KVCache (generation), input_ids continue the cached sequence instead.
        """
        return self.transformer(input_ids, cache)

    def new_cache(self) -> KVCache:
        """An empty KV cache for incremental decoding (moelab.generate)."""
        return self.transformer.new_cache()

    def token_log_probs(self, tokens: torch.Tensor, lengths: torch.Tensor,
                        experts: torch.Tensor) -> torch.Tensor:
        """log p(x_t | x_<t, z) per target, float32 (B, T); 0 at padding. Row b uses experts[b]."""
        B, T = tokens.shape
        expert_ids = self.config.vocab_size + experts.to(tokens.device)  # (B,)
        input_ids = torch.cat([expert_ids[:, None], tokens[:, :-1]], dim=1)  # (B, T)
        logits = self(input_ids)  # (B, T, V+K)
        # cross_entropy on fp32 logits: log_softmax over a large vocabulary loses precision in
        # bf16; reduction="none" keeps only (B, T) floats beyond the logits themselves.
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(),
                              reduction="none").view(B, T)  # (B, T)
        mask = torch.arange(T, device=tokens.device) < lengths.to(tokens.device)[:, None]
        return -nll.masked_fill(~mask, 0.0)  # (B, T)

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
