"""The mean-pool gating network: the learned prior log p(z | c) over K experts."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MeanPoolGating(nn.Module):
    """log p(z | c) = log_softmax(Linear(d, K)(dropout(tanh(Linear(d, d)(mean_pool(c)))))).

    It reads only a representation of the context c (the document's text before the chunk), never
    the chunk it helps to score. An empty context pools to the zero vector, so its output is the
    network's unconditional prior. When the representation is wider or narrower than the gating
    width d (in_dim != dim), a bias-free Linear(in_dim, d) projects it first.
    """

    def __init__(self, in_dim: int, dim: int, num_experts: int, dropout: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=False) if in_dim != dim else nn.Identity()
        self.fc1 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(dim, num_experts)

    def forward(self, reps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """reps (B, C, in_dim) right-padded, lengths (B,) -> log p(z | c) (B, K) float32."""
        C = reps.shape[1]
        mask = torch.arange(C, device=reps.device) < lengths[:, None]  # (B, C)
        summed = (reps * mask[..., None].to(reps.dtype)).sum(dim=1)  # (B, in_dim)
        # clamp: an empty context (length 0) pools to zeros instead of 0/0 = NaN
        pooled = summed / lengths.clamp(min=1)[:, None].to(reps.dtype)  # (B, in_dim)
        h = self.dropout(torch.tanh(self.fc1(self.proj(pooled))))  # (B, d)
        # fp32 so the prior adds to fp32 log-likelihoods without bf16 rounding
        return F.log_softmax(self.fc2(h).float(), dim=-1)  # (B, K)
