"""Each of moelab's speed-ups timed on its own: `moelab bench`'s `techniques` entry.

Every figure is (time without the technique) / (time with it), > 1 when the technique is faster,
both sides timed in the same run, alternating call by call, on the benchmark's batch and
weights. The "without" sides (one expert at a time, unchunked float32 logits, manual attention,
...) live here and nowhere in moelab's core.

Names: batched_estep, chunked_loss_estep, sdpa_attention_estep, chunked_loss_mstep,
kept_softmax_mstep_head, threads_N_vs_1 (CPU), bf16_autocast_cpu_unused (CPU), bf16_autocast and
fused_adam (CUDA), reuse_estep_dropout0[_float32]_{hard,soft} (K > 1; `_float32` where the
M-step runs under autocast, since the E-step is only read off a float32 M-step),
estep_dtype_D and estep_tokens_M (when those options are given), compile (with --compile).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

from moelab.bench.harness import (
    BenchConfig,
    adam,
    bench_model,
    estep_options,
    timed,
)
from moelab.bench.reference import reference_hidden
from moelab.data import Batch
from moelab.model import MixtureLM
from moelab.model.log_probs import KERNELS, TargetLogProbs, chunk_rows, plain_target_log_probs
from moelab.model.mixture import ScoringFunctions
from moelab.presets import BenchmarkPreset
from moelab.train.method import Method
from moelab.train.objectives import em_step
from moelab.train.scoring import ExpertScorer
from moelab.train.update import autocast_context


def _em_step(model: MixtureLM, batch: Batch, optimizer, method: Method, *,
             autocast=contextlib.nullcontext, **scoring_options) -> Callable[[], None]:
    """A bare EM update (em_step, backward, Adam) for the per-technique comparisons; the
    scoring options (ExpertScorer's) are checked once, here."""
    scorer = ExpertScorer(model, **scoring_options)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = em_step(scorer, batch, method)
        (out.loss / batch.num_tokens).backward()
        optimizer.step()
    return step


def _plain_log_likelihood(model: MixtureLM, tokens: torch.Tensor, lengths: torch.Tensor,
                          experts: torch.Tensor) -> torch.Tensor:
    """log p(x | z) (B,) as before chunking: (B, T, V) float32 logits over every position."""
    B, T = tokens.shape
    input_ids = torch.cat([(model.config.vocab_size + experts)[:, None], tokens[:, :-1]], dim=1)
    hidden = model.transformer.hidden(input_ids).flatten(0, 1)  # (B*T, C)
    logp = plain_target_log_probs(hidden, model.output_weight, tokens.flatten(),
                                  model.non_targets)
    mask = torch.arange(T, device=tokens.device) < lengths[:, None]
    return torch.where(mask, logp.view(B, T), 0.0).sum(1)  # (B,)


def _plain_expert_log_likelihoods(model: MixtureLM, tokens: torch.Tensor,
                                  lengths: torch.Tensor) -> torch.Tensor:
    """The batched E-step before chunking (B, K)."""
    B, K = tokens.shape[0], model.num_experts
    experts = torch.arange(K, device=tokens.device).repeat(B)  # (B*K,)
    ll = _plain_log_likelihood(model, tokens.repeat_interleave(K, dim=0),
                               lengths.repeat_interleave(K), experts)
    return ll.view(B, K)


def _manual_attention_expert_log_likelihoods(model: MixtureLM, tokens: torch.Tensor,
                                             lengths: torch.Tensor) -> torch.Tensor:
    """moelab's batched, chunked E-step with the reference's manual attention instead of SDPA."""
    manual = ScoringFunctions(lambda ids: reference_hidden(model.transformer, ids))
    with model.scoring_with(manual):
        return model.expert_log_likelihoods(tokens, lengths)


def measure_techniques(config: BenchConfig, preset: BenchmarkPreset, batch: Batch,
                       device: torch.device, *, all_threads: int = 1) -> dict[str, float]:
    """Each technique's speed-up, (time without) / (time with), on the benchmark's batch."""
    method = Method.parse(config.method)
    model = bench_model(config, preset, device, dropout=preset.dropout)
    K = model.num_experts
    steps = config.steps
    autocast = autocast_context(device)
    out: dict[str, float] = {}

    def ratio(name: str, without: Callable, with_: Callable) -> None:
        t_without, t_with = timed([without, with_], steps, device)
        out[name] = round(t_without / t_with, 3)

    def e_step(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.no_grad(), autocast():
                fn(model, batch.tokens, batch.lengths)
            model.train()
        return run

    def sequential(m: MixtureLM, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        return torch.stack([m.log_likelihood(tokens, lengths, torch.full((B,), k, device=device))
                            for k in range(K)], dim=1)  # (B, K)

    batched = e_step(lambda m, t, n: m.expert_log_likelihoods(t, n))
    if K > 1:
        ratio("batched_estep", e_step(sequential), batched)
    ratio("chunked_loss_estep", e_step(_plain_expert_log_likelihoods), batched)
    ratio("sdpa_attention_estep", e_step(_manual_attention_expert_log_likelihoods), batched)

    def m_step(plain: bool) -> Callable[[], None]:
        """The hard M-step's forward + backward: one expert per row."""
        z = torch.zeros(batch.tokens.shape[0], dtype=torch.long, device=device)
        score = _plain_log_likelihood if plain else MixtureLM.log_likelihood

        def run() -> None:
            model.zero_grad(set_to_none=True)
            with autocast():
                ll = score(model, batch.tokens, batch.lengths, z)  # (B,)
            ll.sum().backward()
        return run

    ratio("chunked_loss_mstep", m_step(True), m_step(False))

    def m_step_kept(keep: bool) -> Callable[[], None]:
        """The same M-step's output projection only, its softmax kept vs recomputed."""
        rows = batch.tokens.shape[0]
        input_ids = torch.cat([torch.full((rows, 1), model.config.vocab_size, device=device),
                               batch.tokens[:, :-1]], dim=1)
        with torch.no_grad():
            hidden = model.transformer.hidden(input_ids).flatten(0, 1)  # (B*T, C)
        hidden.requires_grad_(True)
        weight = model.output_weight
        targets = batch.tokens.flatten()

        def run() -> None:
            model.zero_grad(set_to_none=True)
            hidden.grad = None
            TargetLogProbs.apply(hidden, weight, targets, model.non_targets,
                                 chunk_rows(weight.shape[0], device), KERNELS, keep
                                 ).sum().backward()
        return run

    ratio("kept_softmax_mstep_head", m_step_kept(False), m_step_kept(True))

    optimizer = adam(model, device)
    step = _em_step(model, batch, optimizer, method,
                    autocast=autocast, **estep_options(config))
    threads = torch.get_num_threads()
    many = max(threads, all_threads)
    if device.type == "cpu" and many > 1:
        def with_threads(n: int) -> Callable[[], None]:
            def run() -> None:
                torch.set_num_threads(n)
                try:
                    step()
                finally:
                    torch.set_num_threads(threads)
            return run
        ratio(f"threads_{many}_vs_1", with_threads(1), with_threads(many))
    if device.type == "cpu":  # measured for information: moelab trains in float32 on CPUs
        ratio("bf16_autocast_cpu_unused", step, _em_step(
            model, batch, optimizer, method,
            autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
            **estep_options(config)))
    if device.type == "cuda":
        fp32 = _em_step(model, batch, optimizer, method,
                        **estep_options(config))
        ratio("bf16_autocast", fp32, step)
        foreach, fused = adam(model, device, fused=False), adam(model, device, fused=True)
        model.zero_grad(set_to_none=True)
        step()  # leaves gradients for the optimizer-only comparison
        ratio("fused_adam", foreach.step, fused.step)
    if K > 1:
        # Reuse is exact only without dropout and in float32 (ExpertScorer refuses it under
        # autocast), so both sides run in float32: on CUDA the figure is for
        # `--precision float32` runs.
        free = bench_model(config, preset, device, dropout=0.0)
        free_opt = adam(free, device)
        in_float32 = "" if autocast is contextlib.nullcontext else "_float32"
        ratio(f"reuse_estep_dropout0{in_float32}_{'hard' if method.hard else 'soft'}",
              _em_step(free, batch, free_opt, method,
                       reuse_estep=False),
              _em_step(free, batch, free_opt, method,
                       reuse_estep=True))
    if config.estep_dtype is not None and K > 1:
        fp = _em_step(model, batch, optimizer, method,
                      autocast=autocast, estep_tokens=config.estep_tokens)
        ratio(f"estep_dtype_{config.estep_dtype}", fp, step)
    if config.estep_tokens is not None and K > 1:
        full = _em_step(model, batch, optimizer, method,
                        autocast=autocast)
        ratio(f"estep_tokens_{config.estep_tokens}", full, step)
    if config.compile:
        compiled = copy.deepcopy(model)
        if compiled.compile_for_speed():
            c_opt = adam(compiled, device)
            ratio("compile", step, _em_step(compiled, batch, c_opt, method, autocast=autocast,
                                            **estep_options(config)))
    return out
