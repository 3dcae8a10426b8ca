"""log p(target) from hidden states, a chunk of rows at a time, exactly.

Scoring K experts projects B*K*T hidden states onto the whole vocabulary. Materializing those
logits in float32 is the largest tensor of a step (fairseq preset: 70 x 512 x 50k x 4 bytes = 7 GB)
and, on a CPU, writing and re-reading it costs more than the projection itself. Here each chunk's
logits live only while that chunk is reduced to (log p(target), logsumexp); backward recomputes
them from the saved hidden states (one extra projection per chunk, no (N, V) tensor kept).
The result is the same function as `log_softmax(hidden @ weight.T)[target]` (tests check 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Elements (rows x vocabulary) of one chunk's logits. CPU: ~16 MB of float32 stays in cache;
# CUDA: 1 GiB of float32 is large enough that the matmuls stay efficient, small enough to fit.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}
# With autograd, the float32 softmax of all rows is kept for backward (as plain autograd keeps
# log_softmax) when it takes at most this many elements; above, backward recomputes each chunk's
# logits instead (one more projection, no (N, V) tensor). fairseq preset: the hard M-step's
# 7 x 512 x 50k (0.7 GB) is kept, the soft M-step's 70 x 512 x 50k (7 GB) is recomputed.
SAVE_ELEMENTS = {"cpu": 1 << 28, "cuda": 1 << 29}


def chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, 1 << 26) // vocab)


def chunk_log_probs(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                    excluded: torch.Tensor, scratch: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: (n, C) hidden, (V, C) weight, (n,) targets -> log p(target), logsumexp, (n,).

    `excluded` ids (never targets) get probability 0: their logits are -inf.

    `scratch`, an (n, V) tensor of h's dtype (float32) that the caller lends, receives the
    logits and is overwritten in place: on a CPU, a fresh (n, V) tensor per chunk (page faults
    every time) plus a log-softmax written beside it cost about as much as the projection.
    """
    if scratch is not None and scratch.dtype == h.dtype:
        logits = torch.mm(h, w.t(), out=scratch)  # (n, V)
    else:
        logits = _at_least_float32(h @ w.t())  # (n, V)
    logits.index_fill_(1, excluded, -math.inf)
    # float32 logsumexp: over a large vocabulary bf16 loses the small probabilities
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
    top = logits.amax(dim=1, keepdim=True)  # (n, 1)
    lse = logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))  # (n,)
    return target_logit - lse, lse


def chunk_log_probs_and_softmax(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                                excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: log p(target) (n,) and the whole softmax (n, V), kept for backward.

    The softmax is made in the logits' own storage (no log-softmax tensor beside it).
    """
    logits = _at_least_float32(h @ w.t()).index_fill_(1, excluded, -math.inf)  # (n, V)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
    top = logits.amax(dim=1, keepdim=True)  # (n, 1)
    probs = logits.sub_(top).exp_()  # (n, V), unnormalized
    total = probs.sum(dim=1, keepdim=True)  # (n, 1)
    logp = target_logit - (total.log() + top).squeeze(1)  # (n,)
    return logp, probs.div_(total)


def chunk_logit_grad(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                     excluded: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor
                     ) -> torch.Tensor:
    """d(sum_i grad_i * log p(target_i)) / d logits for one chunk: grad * (onehot - softmax)."""
    logits = _at_least_float32(h @ w.t())  # (n, V), recomputed: nothing of size V was kept
    logits.index_fill_(1, excluded, -math.inf)  # softmax 0 there: those rows get no gradient
    probs = logits.sub_(lse[:, None]).exp_()  # (n, V)
    return _softmax_grad(probs, targets, grad, out=probs).to(h.dtype)


def _softmax_grad(probs: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """grad * (onehot(targets) - probs), written into `out` (may be `probs` itself)."""
    dlogits = torch.mul(probs, -grad[:, None], out=out)  # (n, V)
    return dlogits.scatter_add_(1, targets[:, None], grad[:, None])


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for this device (bf16 on CUDA), else t's own."""
    kind = t.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


class TargetLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[targets] (N,), >= float32, chunked forward and backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                excluded: torch.Tensor, rows: int,
                kernels: tuple[Callable, Callable, Callable], keep: bool) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        N = hidden.shape[0]
        # autocast is off inside: the casts below are explicit, and backward repeats them
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            out = torch.empty(N, dtype=torch.promote_types(dtype, torch.float32),
                              device=h.device)  # (N,)
            lse = torch.empty_like(out) if not keep else out.new_empty(0)  # (N,)
            probs = []  # per chunk (n, V) when kept
            eager_fp32 = kernels[0] is chunk_log_probs and dtype == out.dtype
            scratch = (torch.empty(min(rows, N), w.shape[0], dtype=dtype, device=h.device)
                       if not keep and eager_fp32 else None)
            for s in range(0, N, rows):
                if keep:
                    out[s : s + rows], p = kernels[2](h[s : s + rows], w, targets[s : s + rows],
                                                      excluded)
                    probs.append(p)
                else:
                    n = min(rows, N - s)
                    args = (h[s : s + n], w, targets[s : s + n], excluded)
                    if scratch is not None:  # the eager kernel: one logits buffer for all chunks
                        args += (scratch[:n],)
                    out[s : s + n], lse[s : s + n] = kernels[0](*args)
        ctx.save_for_backward(h, w, targets, excluded, lse, *probs)
        ctx.rows, ctx.kernels, ctx.keep = rows, kernels, keep
        ctx.dtypes = hidden.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, w, targets, excluded, lse, *probs = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None  # (N, C)
        grad_w = (torch.zeros(w.shape, dtype=grad_out.dtype, device=w.device)  # >= float32
                  if need_w else None)
        scratch = None
        with torch.autocast(h.device.type, enabled=False):
            for i, s in enumerate(range(0, h.shape[0], ctx.rows)):
                hs, g = h[s : s + ctx.rows], grad_out[s : s + ctx.rows]
                if ctx.keep:  # the kept softmax stays intact (a retained graph reuses it)
                    n = probs[i].shape[0]
                    if scratch is None:
                        scratch = torch.empty_like(probs[i])  # one buffer for every chunk
                    dlogits = _softmax_grad(probs[i], targets[s : s + n], g,
                                            out=scratch[:n]).to(h.dtype)
                else:
                    dlogits = ctx.kernels[1](hs, w, targets[s : s + ctx.rows], excluded,
                                             lse[s : s + ctx.rows], g)  # (n, V)
                if need_h:
                    grad_h[s : s + ctx.rows] = dlogits @ w  # (n, C)
                if need_w:
                    grad_w += dlogits.t() @ hs  # (V, C), accumulated in float32
        return (grad_h.to(ctx.dtypes[0]) if need_h else None,
                grad_w.to(ctx.dtypes[1]) if need_w else None, None, None, None, None, None)


KERNELS = (chunk_log_probs, chunk_logit_grad, chunk_log_probs_and_softmax)


def target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     excluded: torch.Tensor | None = None, rows: int | None = None,
                     kernels: tuple[Callable, Callable, Callable] = KERNELS) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) under the output projection `weight`, float32 (N,).

    hidden (N, C), weight (V, C), targets (N,); `excluded` ids (never targets) are left out of
    the softmax. `rows` per chunk (default: CHUNK_ELEMENTS / V); `kernels` may be
    torch.compile'd versions of KERNELS.
    """
    if excluded is None:
        excluded = torch.zeros(0, dtype=torch.long, device=hidden.device)
    rows = rows or chunk_rows(weight.shape[0], hidden.device)
    # no graph (the E-step, evaluation): nothing is kept for a backward that never comes
    graph = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep = graph and hidden.shape[0] * weight.shape[0] <= SAVE_ELEMENTS.get(
        hidden.device.type, 1 << 28)
    return TargetLogProbs.apply(hidden, weight, targets, excluded, rows, kernels, keep)


def plain_target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           excluded: torch.Tensor | None = None) -> torch.Tensor:
    """The unchunked reference: all (N, V) float32 logits at once (benchmarks and tests)."""
    logits = _at_least_float32(hidden @ weight.to(hidden.dtype).t())  # (N, V)
    if excluded is not None:
        logits = logits.index_fill(1, excluded, -math.inf)
    return -F.cross_entropy(logits, targets, reduction="none")  # (N,)
