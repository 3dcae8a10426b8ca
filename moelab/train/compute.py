"""What an update costs: the model FLOPs of one EM update, by part, from its batches' shapes.

Counted as model FLOPs (PaLM's convention): 2 per multiply-add of every matrix multiplication
the update's mathematics needs, forward and backward; elementwise work (softmax, layer norm,
GELU, Adam) is left out, and so is any recomputation an implementation chooses for memory (the
chunked loss recomputes its logits in backward when the softmax does not fit: hardware FLOPs,
not model FLOPs). Per micro-batch of B chunks padded to length T, with n real targets:

- a body forward (the Transformer without its output projection) costs, per position of a row,
  2 * W + 4 * L * T * d: W the weights of the blocks' matmuls (L * (4 d^2 + 2 d f)), and the
  attention scores and their product with the values over the padded length (the full T x T,
  no discount for the causal mask); padding positions are computed, so they count;
- the output projection onto the real vocabulary (V rows: the expert tokens are inputs only)
  costs 2 * V * d per target scored: padding and expert tokens are never projected;
- the learned prior's gating network costs 2 * (d * g [when d != g] + g * g + g * K) per chunk
  and pass; a uniform prior and dense have none;
- a backward pass costs twice its forward (the gradients of the inputs and of the weights).

The parts of an update:

- `estep`: K forwards of the body over the tokens the E-step scores (the whole chunk, or its
  first M with `--estep-tokens`); none for dense (one expert: its posterior is 1 unscored), none
  in a warm start's updates (the clusters choose), none where the E-step is read off the
  M-step's forward (`reuse`);
- `mstep`: the body's forward and backward for the experts the M-step trains: one row per chunk
  for hard EM, K for soft EM (and for a reused E-step);
- `gating`: the prior network, forward in the E-step, forward and backward in the M-step;
- `output`: the output projection, in the E-step and in the M-step (forward and backward).

`moelab train` logs the running sum (`train_flops`); `moelab bench`'s MFU divides the same
count of its timed step by the step's time. tests/test_compute.py holds it against
`torch.utils.flop_counter.FlopCounterMode` on real updates of every method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moelab.model import ModelConfig
from moelab.train.method import Method


@dataclass(frozen=True)
class Flops:
    """Model FLOPs, by part of the EM update (see the module docstring)."""

    estep: float = 0.0
    mstep: float = 0.0
    gating: float = 0.0
    output: float = 0.0

    @property
    def total(self) -> float:
        return self.estep + self.mstep + self.gating + self.output

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.estep + other.estep, self.mstep + other.mstep,
                     self.gating + other.gating, self.output + other.output)

    def scaled(self, factor: float) -> Flops:
        return Flops(self.estep * factor, self.mstep * factor, self.gating * factor,
                     self.output * factor)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def body_weights(config: ModelConfig) -> int:
    """W: the weights of the blocks' matmuls (attention's qkv and projection, the MLP's two)."""
    d, f = config.n_embd, config.ffn_dim
    return config.n_layer * (4 * d * d + 2 * d * f)


def gating_weights(config: ModelConfig) -> int:
    """The gating network's matmul weights (its optional input projection, fc1, fc2); 0 when
    the model has none."""
    if not config.gating:
        return 0
    d, g, K = config.n_embd, config.gating_dim, config.num_experts
    return (d * g if d != g else 0) + g * g + g * K


def body_forward(config: ModelConfig, rows: int, length: int) -> float:
    """One forward of the body over `rows` rows padded to `length` positions."""
    per_position = 2 * body_weights(config) + 4 * config.n_layer * length * config.n_embd
    return float(rows * length * per_position)


def output_forward(config: ModelConfig, targets: int) -> float:
    """The output projection of `targets` positions onto the real vocabulary."""
    return float(2 * config.vocab_size * config.n_embd * targets)


def batch_flops(config: ModelConfig, lengths: torch.Tensor | list[int], length: int, *,
                method: Method, estep_tokens: int | None = None,
                reuse: bool = False, estep: bool = True) -> Flops:
    """The model FLOPs of one EM step on a batch of chunks (forward and backward).

    lengths: each chunk's number of targets (B,); length: the batch's padded length T.
    method: hard or soft EM, uniform or learned prior (moelab.train.method);
    estep_tokens: the E-step's prefix (None: the whole chunk);
    reuse: the E-step is read off the M-step's forward (moelab.train.scoring.ExpertScorer);
    estep: False where no E-step runs (a warm start's clusters choose the experts).
    """
    lengths = torch.as_tensor(lengths)
    B, K = int(lengths.numel()), config.num_experts
    targets = int(lengths.sum())
    # one pass, all chunks
    gating = 0.0 if method.uniform_prior else 2.0 * gating_weights(config) * B
    scores_estep = estep and K > 1 and not reuse
    estep_body = estep_output = estep_gating = 0.0
    if scores_estep:
        m = length if estep_tokens is None else min(estep_tokens, length)
        scored = targets if estep_tokens is None else int(lengths.clamp(max=m).sum())
        estep_body = body_forward(config, B * K, m)
        estep_output = output_forward(config, K * scored)
        estep_gating = gating
    rows = 1 if method.hard and not reuse else K  # M-step rows per chunk
    if K == 1:
        rows = 1
    return Flops(estep=estep_body,
                 mstep=3 * body_forward(config, B * rows, length),
                 gating=estep_gating + 3 * gating,
                 output=estep_output + 3 * output_forward(config, rows * targets))
