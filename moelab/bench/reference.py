"""The fairseq-style reference step that `moelab bench` times moelab's training step against.

It does what fairseq's translation_moe `_get_loss` does on a plain transformer_lm: K separate
float32 forwards for the E-step (one expert at a time), manual attention (q @ k^T, mask, softmax,
@ v), the full (rows, T, V) float32 log-softmax, then the M-step (the chosen expert for hard EM,
K more forwards for soft EM), backward and a plain Adam step. It computes the same function as
moelab's step (tests/test_bench.py checks the log-likelihoods), with none of its speed-ups.

Nothing in moelab's core (moelab.train, moelab.model, evaluation, generation) imports this.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moelab.data import Batch
from moelab.model import MixtureLM, Transformer
from moelab.train.method import Method
from moelab.train.objectives import PosteriorLogSumExp


def reference_hidden(tr: Transformer, input_ids: torch.Tensor) -> torch.Tensor:
    """The Transformer's forward with manual (unfused) attention, as fairseq's MultiheadAttention.

    Same weights and same function as `Transformer.hidden`; only the attention kernel differs.
    """
    B, T = input_ids.shape
    C, nh = tr.config.n_embd, tr.config.n_head
    x = tr.drop(tr.tok_emb(input_ids) + tr.pos_emb(torch.arange(T, device=input_ids.device)))
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
    for block in tr.blocks:
        a = block.attn
        q, k, v = a.qkv(block.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // nh)  # (B, nh, T, T)
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
        att = F.dropout(att, a.attention_dropout, tr.training)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + a.resid_dropout(a.proj(y))
        x = x + block.mlp(block.ln_2(x))
    return tr.ln_f(x)  # (B, T, C)


def reference_log_likelihood(model: MixtureLM, tokens: torch.Tensor, lengths: torch.Tensor,
                             experts: torch.Tensor) -> torch.Tensor:
    """log p(x | z) per row (B,): manual attention, all (B, T, V) float32 log-probs at once."""
    T = tokens.shape[1]
    input_ids = torch.cat([(model.config.vocab_size + experts)[:, None], tokens[:, :-1]], dim=1)
    logits = model.output_logits(reference_hidden(model.transformer, input_ids))  # (B, T, V)
    lprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V): fairseq's get_normalized_probs
    ll = lprobs.gather(2, tokens[:, :, None]).squeeze(2)  # (B, T)
    mask = torch.arange(T, device=tokens.device) < lengths[:, None]
    return torch.where(mask, ll, 0.0).sum(1)  # (B,): padding targets (pad id) are -inf


def reference_step(model: MixtureLM, batch: Batch, optimizer: torch.optim.Optimizer,
                   method: Method) -> None:
    """fairseq translation_moe's `_get_loss`: one float32 forward per expert, then backward."""
    B, K = batch.tokens.shape[0], model.num_experts

    def lprob_yz(winners: torch.Tensor | None = None) -> torch.Tensor:
        if winners is None:  # K sequential forwards
            lprob_y = torch.stack([
                reference_log_likelihood(model, batch.tokens, batch.lengths,
                                         torch.full((B,), k, device=batch.tokens.device))
                for k in range(K)], dim=1)  # (B, K)
        else:
            lprob_y = reference_log_likelihood(model, batch.tokens, batch.lengths,
                                               winners)[:, None]  # (B, 1)
        if method.uniform_prior:
            return lprob_y - math.log(K)
        lprob_z = model.log_prior(batch.context, batch.context_lengths)  # (B, K)
        if winners is not None:
            lprob_z = lprob_z.gather(1, winners[:, None])
        return lprob_y + lprob_z

    optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        posterior = lprob_yz().softmax(dim=1)  # (B, K)
    model.train()
    if method.hard:
        loss = -lprob_yz(posterior.argmax(1)).sum()
    else:
        loss = PosteriorLogSumExp.apply(lprob_yz(), posterior).sum()
    (loss / batch.num_tokens).backward()
    optimizer.step()
