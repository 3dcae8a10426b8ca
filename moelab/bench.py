"""`moelab bench`: training, eval-lm and sampling speed vs a fairseq-style reference, in one run.

Training. The reference does what fairseq's translation_moe `_get_loss` does on a plain
transformer_lm: K separate float32 forwards for the E-step (one expert at a time), manual
attention (q @ k^T, mask, softmax, @ v), full (rows, T, V) float32 log-softmax, then the M-step
(the chosen expert for hard EM, K more forwards for soft EM), backward and a plain Adam step.
moelab's step is `moelab.train.trainer.train_step`, exactly what `moelab train` runs. Both start
from the same weights and see the same batch; their steps alternate, and the median step time of
each is reported, so a busy machine slows both alike. The `ratio` is reference time / moelab time.

Techniques. Each speed-up is also measured on its own, in the same run, as (time without) / (time
with): see TECHNIQUES. They are computed on the same batch and weights as the main figure.

MFU (CUDA only; null on CPU). Model FLOPs per target token of one step, PaLM-style (matmuls only):
    F(T) = 2 * N + 4 * L * T * d          one forward: N = weights of all matmuls (attention,
                                          MLP, and the output projection over the REAL
                                          vocabulary: expert tokens are inputs only, never
                                          scored; not the embedding lookups), L layers, width d,
                                          T the batch's padded length (the attention scores and
                                          their product with the values, causal or not)
    step = K * f * F(f * T) + 3 * M * F(T)
                                          E-step: K forwards of the first f * T tokens (f = 1,
                                          or --estep-tokens / T), M = rows of the M-step per
                                          chunk (1 hard, K soft), forward + backward = 3
                                          forwards; with reuse_estep the E-step is the M-step's
                                          forward, so step = 3 * K * F(T).
The learned prior's gating network (two small matmuls per chunk, not per token) is left out.
For hard EM that is (2K + 6) * N + attention per token; tests/test_bench.py checks the formula
against torch's FlopCounterMode. MFU = step FLOPs * tokens/s / 989.4e12 (the H200's dense bf16
peak, used as the anchor on every GPU).

Memory: `peak_memory_bytes` is torch.cuda.max_memory_allocated over moelab's timed steps; on CPU
the process's resident-set high-water mark (VmHWM of /proc/self/status, reset before the steps
where the kernel allows it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.data import Batch
from moelab.model import MixtureLM, Transformer
from moelab.model.loss import KERNELS, TargetLogProbs, chunk_rows, plain_target_log_probs
from moelab.train.config import ModelArgs, model_config
from moelab.train.distributed import DistInfo
from moelab.train.objectives import (
    ESTEP_DTYPES,
    METHODS,
    PosteriorLogSumExp,
    em_loss,
    method_flags,
    reuses_estep,
)
from moelab.train.trainer import EMStep, autocast_context, train_step

# The MFU denominator: the H200's (SXM, = H100 SXM) dense bf16 tensor-core peak, 132 SMs x
# 4,096 FLOP per clock per SM x 1.83 GHz = 989.4 TFLOPS (NVIDIA's datasheet figure without
# sparsity; 1,979 with 2:4 sparsity).
PEAK_FLOPS = 989.4e12


@dataclass
class BenchPreset:
    arch: str  # moelab.model.PRESETS name
    vocab_size: int  # tokenizer vocabulary (a real data-bin's, not the expert tokens)
    num_experts: int  # K
    tokens_per_sample: int  # T
    max_tokens: int  # rows x T per batch (fairseq --max-tokens)
    dropout: float  # the seed command's --dropout


BENCH_PRESETS = {
    # a laptop-sized run: the tiny model on a bundled-corpus-sized vocabulary (preprocess default)
    "tiny": BenchPreset("tiny", vocab_size=8000, num_experts=4, tokens_per_sample=128,
                        max_tokens=2048, dropout=0.1),
    # the seed README's training command: transformer_lm, GPT-2 BPE vocabulary, K=10, T=512
    "seed": BenchPreset("transformer_lm", vocab_size=50257, num_experts=10,
                        tokens_per_sample=512, max_tokens=3584, dropout=0.1),
}


@dataclass
class BenchConfig:
    preset: str | None = None  # BENCH_PRESETS name; None: seed on CUDA, tiny on CPU
    method: str = "hMoEup"  # training method of the timed step
    num_experts: int | None = None  # K (default: the preset's)
    steps: int = 10  # timed steps of each side (after one warm-up); the median is reported
    device: str = "auto"  # auto: cuda if available, else cpu
    compile: bool = False  # torch.compile moelab's model (falls back to eager if it fails)
    estep_tokens: int | None = None  # E-step on the first M targets of each chunk
    estep_dtype: str | None = None  # E-step under autocast to bfloat16/float16
    threads: int | None = None  # torch CPU threads; None: 1 on CPU (see run_benchmark)
    reference: bool = True  # also time the fairseq-style reference (off: moelab's step only)
    techniques: bool = True  # also time each technique on its own
    eval_sample: bool = True  # also time eval-lm scoring and sampling

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.preset is None:
            self.preset = "seed" if self.device.startswith("cuda") else "tiny"
        if self.preset not in BENCH_PRESETS:
            raise ValueError(f"unknown --preset {self.preset!r}; choose from "
                             f"{', '.join(BENCH_PRESETS)}")
        method_flags(self.method)  # raises with the valid names
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.estep_tokens is not None and self.estep_tokens < 1:
            raise ValueError(f"--estep-tokens must be >= 1, got {self.estep_tokens}")
        if self.estep_dtype not in (None, *ESTEP_DTYPES):
            raise ValueError(f"--estep-dtype must be one of {', '.join(ESTEP_DTYPES)}")


# ----------------------------------------------------------------------------- the reference


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


def reference_step(model: MixtureLM, batch: Batch, optimizer: torch.optim.Optimizer, *,
                   hard: bool, uniform_prior: bool) -> None:
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
        if uniform_prior:
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
    if hard:
        loss = -lprob_yz(posterior.argmax(1)).sum()
    else:
        loss = PosteriorLogSumExp.apply(lprob_yz(), posterior).sum()
    (loss / batch.num_tokens).backward()
    optimizer.step()


# ----------------------------------------------------------------------------- inputs


def synthetic_batch(*, rows: int, seq_len: int, vocab_size: int, pad_id: int,
                    generator: torch.Generator) -> Batch:
    """A training batch as batch_by_size makes them: full chunks, the last row a document's end.

    Every other row has a context (a later chunk of its document) of seq_len / 2 tokens.
    """
    lengths = torch.full((rows,), seq_len)
    lengths[-1] = max(1, 3 * seq_len // 4)
    tokens = torch.randint(4, vocab_size, (rows, seq_len), generator=generator)
    tokens[torch.arange(seq_len) >= lengths[:, None]] = pad_id
    context_lengths = (torch.arange(rows) % 2) * (seq_len // 2)
    context = torch.randint(4, vocab_size, (rows, seq_len // 2), generator=generator)
    context[torch.arange(seq_len // 2) >= context_lengths[:, None]] = pad_id
    return Batch(tokens=tokens, lengths=lengths, context=context, context_lengths=context_lengths,
                 doc_ids=torch.arange(rows), domain_ids=torch.zeros(rows, dtype=torch.long))


def synthetic_bin(root: Path, docs_per_domain: int = 40, words: int = 300) -> Path:
    """A small data-bin of three domains with their own letters, one file per document."""
    from moelab.data import PreprocessConfig, preprocess

    rng = random.Random(0)
    for d, domain in enumerate(("alpha", "beta", "gamma")):
        letters = "abcdefghijklmnopqrstuvwxyz"[d * 8 : d * 8 + 10]
        vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(50)]
        folder = root / "corpus" / domain
        folder.mkdir(parents=True)
        for i in range(docs_per_domain):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            (folder / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    destdir = root / "bin"
    preprocess(PreprocessConfig(destdir=str(destdir), data=str(root / "corpus"), vocab_size=512,
                                valid_fraction=0.2, test_fraction=0.2))
    return destdir


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: list[Callable[[], object]], steps: int, device: torch.device,
          warmup: int = 1) -> list[float]:
    """Median seconds per call of each function; the functions alternate, call by call.

    Alternating means a busy machine slows all of them alike; the median drops the calls
    another process interrupted.
    """
    def one(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[one(fn) for fn in fns] for _ in range(steps)]
    return [statistics.median(t[i] for t in times) for i in range(len(fns))]


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # "5" resets VmHWM (Linux >= 4.0); else it only grows
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(model: MixtureLM) -> int:
    """N: weights that multiply activations: the blocks' and the output projection's rows of
    the real vocabulary (the K expert-token rows are never scored); not the lookups."""
    tr, c = model.transformer, model.config
    blocks = sum(m.weight.numel() for m in tr.blocks.modules() if isinstance(m, torch.nn.Linear))
    return blocks + c.vocab_size * c.n_embd


def step_flops_per_token(model: MixtureLM, seq_len: int, *, hard: bool, reuse: bool,
                         estep_fraction: float = 1.0) -> float:
    """Model FLOPs of one EM step per target token (the formula in the module docstring)."""
    c = model.config
    N = matmul_params(model)

    def forward(length: float) -> float:  # per token, rows of `length` tokens
        return 2 * N + 4 * c.n_layer * length * c.n_embd

    K = c.num_experts
    if K == 1:
        return 3 * forward(seq_len)
    if reuse:
        return 3 * K * forward(seq_len)
    estep = K * estep_fraction * forward(estep_fraction * seq_len)  # the first f * T tokens
    return estep + 3 * (1 if hard else K) * forward(seq_len)


# ----------------------------------------------------------------------------- the benchmark


def _model(config: BenchConfig, preset: BenchPreset, device: torch.device, *, dropout: float
           ) -> MixtureLM:
    margs = ModelArgs(arch=preset.arch, method=config.method, dropout=dropout,
                      num_experts=1 if config.method == "dense"
                      else config.num_experts or preset.num_experts)
    mconf = model_config(margs, vocab_size=preset.vocab_size, pad_id=3,
                         tokens_per_sample=preset.tokens_per_sample)
    torch.manual_seed(0)
    return MixtureLM(mconf).to(device).train()


def _adam(model: MixtureLM, device: torch.device, *, fused: bool | None = None
          ) -> torch.optim.Adam:
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)


def _estep_options(config: BenchConfig) -> dict:
    """The E-step options of moelab's timed step, as em_loss / EMStep take them."""
    return {"estep_tokens": config.estep_tokens,
            "estep_dtype": ESTEP_DTYPES[config.estep_dtype] if config.estep_dtype else None}


def _em_step(model: MixtureLM, batch: Batch, optimizer, *, hard: bool, uniform_prior: bool,
             autocast=contextlib.nullcontext, **em_options) -> Callable[[], None]:
    """A bare EM update (em_loss, backward, Adam) for the per-technique comparisons."""
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = em_loss(model, batch, hard=hard, uniform_prior=uniform_prior, **em_options)
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
    original = model._scoring
    model._scoring = (lambda ids: reference_hidden(model.transformer, ids), KERNELS)
    try:
        return model.expert_log_likelihoods(tokens, lengths)
    finally:
        model._scoring = original


def measure_techniques(config: BenchConfig, preset: BenchPreset, batch: Batch,
                       device: torch.device, *, all_threads: int = 1) -> dict[str, float]:
    """Each technique's speed-up, (time without) / (time with), on the benchmark's batch."""
    hard, uniform_prior = method_flags(config.method)
    model = _model(config, preset, device, dropout=preset.dropout)
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

    optimizer = _adam(model, device)
    step = _em_step(model, batch, optimizer, hard=hard, uniform_prior=uniform_prior,
                    autocast=autocast, **_estep_options(config))
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
            model, batch, optimizer, hard=hard, uniform_prior=uniform_prior,
            autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
            **_estep_options(config)))
    if device.type == "cuda":
        fp32 = _em_step(model, batch, optimizer, hard=hard, uniform_prior=uniform_prior,
                        **_estep_options(config))
        ratio("bf16_autocast", fp32, step)
        foreach, fused = _adam(model, device, fused=False), _adam(model, device, fused=True)
        model.zero_grad(set_to_none=True)
        step()  # leaves gradients for the optimizer-only comparison
        ratio("fused_adam", foreach.step, fused.step)
    if K > 1:
        # Reuse is exact only without dropout and in float32 (em_loss refuses it under autocast),
        # so both sides run in float32: on CUDA the figure is for `--precision float32` runs.
        free = _model(config, preset, device, dropout=0.0)
        free_opt = _adam(free, device)
        in_float32 = "" if autocast is contextlib.nullcontext else "_float32"
        ratio(f"reuse_estep_dropout0{in_float32}_{'hard' if hard else 'soft'}",
              _em_step(free, batch, free_opt, hard=hard, uniform_prior=uniform_prior,
                       reuse_estep=False),
              _em_step(free, batch, free_opt, hard=hard, uniform_prior=uniform_prior,
                       reuse_estep=True))
    if config.estep_dtype is not None and K > 1:
        fp = _em_step(model, batch, optimizer, hard=hard, uniform_prior=uniform_prior,
                      autocast=autocast, estep_tokens=config.estep_tokens)
        ratio(f"estep_dtype_{config.estep_dtype}", fp, step)
    if config.estep_tokens is not None and K > 1:
        full = _em_step(model, batch, optimizer, hard=hard, uniform_prior=uniform_prior,
                        autocast=autocast)
        ratio(f"estep_tokens_{config.estep_tokens}", full, step)
    if config.compile:
        compiled = copy.deepcopy(model)
        if compiled.compile_for_speed():
            c_opt = _adam(compiled, device)
            ratio("compile", step, _em_step(compiled, batch, c_opt, hard=hard,
                                            uniform_prior=uniform_prior, autocast=autocast,
                                            **_estep_options(config)))
    return out


def measure_training(config: BenchConfig, preset: BenchPreset, device: torch.device, *,
                     all_threads: int = 1) -> dict:
    hard, uniform_prior = method_flags(config.method)
    batch = synthetic_batch(rows=max(1, preset.max_tokens // preset.tokens_per_sample),
                            seq_len=preset.tokens_per_sample, vocab_size=preset.vocab_size,
                            pad_id=3, generator=torch.Generator().manual_seed(0))
    on_device = batch.to(device)
    dist = DistInfo(device=device)

    model = _model(config, preset, device, dropout=preset.dropout)
    compile_info = None
    if config.compile:
        active = model.compile_for_speed()
        compile_info = {"requested": True, "active": active}
    optimizer = _adam(model, device)
    step_module = EMStep(model, hard=hard, uniform_prior=uniform_prior,
                         **_estep_options(config))
    autocast = autocast_context(device)
    if config.reference:
        ref_model = _model(config, preset, device, dropout=preset.dropout)
        ref_optimizer = torch.optim.Adam(ref_model.parameters(), lr=1e-4)

    def ours() -> None:
        train_step(step_module, [batch], optimizer, dist=dist, clip_norm=0.0, autocast=autocast)

    def reference() -> None:
        reference_step(ref_model, on_device, ref_optimizer, hard=hard,
                       uniform_prior=uniform_prior)

    ours()  # warm up (and compile) before the memory high-water mark is taken
    _reset_peak_memory(device)
    ours()
    peak = peak_memory_bytes(device)
    t_ref = ref_peak = None
    if config.reference:
        _reset_peak_memory(device)
        reference()
        ref_peak = peak_memory_bytes(device)
        t_ours, t_ref = timed([ours, reference], config.steps, device)
    else:
        (t_ours,) = timed([ours], config.steps, device, warmup=0)  # warmed up above
    tokens = batch.num_tokens
    reuse = reuses_estep(model, hard=hard, **_estep_options(config))
    estep_fraction = (1.0 if config.estep_tokens is None
                      else min(1.0, config.estep_tokens / preset.tokens_per_sample))
    flops = step_flops_per_token(model, batch.tokens.shape[1], hard=hard, reuse=reuse,
                                 estep_fraction=estep_fraction)
    if compile_info is not None:
        body = model._scoring[0]
        compile_info.update(active=body.active, error=body.error)
    result = {
        "batch_rows": int(batch.tokens.shape[0]), "batch_tokens": tokens,
        "tokens_per_s": round(tokens / t_ours, 1),
        "reference_tokens_per_s": round(tokens / t_ref, 1) if t_ref else None,
        "ratio": round(t_ref / t_ours, 3) if t_ref else None,
        "step_s": round(t_ours, 4), "reference_step_s": round(t_ref, 4) if t_ref else None,
        "flops_per_token": flops,
        "mfu": round(flops * tokens / t_ours / PEAK_FLOPS, 4) if device.type == "cuda" else None,
        "peak_memory_bytes": peak, "reference_peak_memory_bytes": ref_peak,
        "compile": compile_info,
    }
    if config.techniques:
        result["techniques"] = measure_techniques(config, preset, on_device, device,
                                                  all_threads=all_threads)
    return result


def measure_eval_and_sample(config: BenchConfig, preset: BenchPreset, device: torch.device,
                            *, new_tokens: int = 128, repeat: int = 2) -> dict:
    """eval-lm document tokens per second (all K experts) and sampling with/without KV cache."""
    from moelab.data import BinarizedDataset
    from moelab.evaluate import evaluate
    from moelab.generate import GenerationConfig, generate
    from moelab.model import config_from_preset

    K = 1 if config.method == "dense" else config.num_experts or preset.num_experts
    T = preset.tokens_per_sample
    with tempfile.TemporaryDirectory() as tmp:
        ds = BinarizedDataset(synthetic_bin(Path(tmp)), "valid")
        tokenizer = ds.tokenizer()
        torch.manual_seed(0)
        # max_seq_len leaves room for the prompt + all new tokens: no window slide while sampling
        mconf = config_from_preset(preset.arch, vocab_size=ds.vocab_size, pad_id=ds.pad_id,
                                   num_experts=K, max_seq_len=max(T, new_tokens + 64),
                                   dropout=0.0)
        model = MixtureLM(mconf).to(device).eval()
        tokens = int(ds.offsets[-1])

        def best(fn) -> float:
            seconds = []
            for _ in range(repeat):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                seconds.append(time.perf_counter() - start)
            return min(seconds)

        autocast = autocast_context(device)
        with autocast():
            eval_s = best(lambda: evaluate(model, ds, tokens_per_sample=T, context_window=T // 2,
                                           max_sentences=max(1, preset.max_tokens // T),
                                           progress=False))

        def sample(use_cache: bool) -> None:
            cfg = GenerationConfig(max_new_tokens=new_tokens, min_len=new_tokens, sampling=True,
                                   top_p=0.9, seed=1, use_cache=use_cache)
            generate(model, tokenizer, "the", expert=0, config=cfg)

        cached, plain = best(lambda: sample(True)), best(lambda: sample(False))
    return {"eval_tokens_per_s": round(tokens / eval_s, 1),
            "eval_context_window": T // 2, "eval_tokens": tokens,
            "sample_tokens_per_s_cache": round(new_tokens / cached, 1),
            "sample_tokens_per_s_no_cache": round(new_tokens / plain, 1),
            "kv_cache_speedup": round(plain / cached, 3)}


def run_benchmark(config: BenchConfig) -> dict:
    """All figures of one `moelab bench` run as a dict (the JSON line)."""
    device = torch.device(config.device)
    all_threads = torch.get_num_threads()
    # One thread by default: the tiny preset's small ops gain little from more, and on a shared
    # machine a thread that waits for a busy core stalls every op (measured: 60x slower at 2
    # threads under load). The `threads_N_vs_1` technique shows what N threads give here.
    torch.set_num_threads(config.threads or (1 if device.type == "cpu" else all_threads))
    preset = BENCH_PRESETS[config.preset]
    result: dict = {
        "benchmark": "moelab bench", "preset": config.preset, "method": config.method,
        "arch": preset.arch, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        "num_experts": 1 if config.method == "dense"
        else config.num_experts or preset.num_experts,
        "tokens_per_sample": preset.tokens_per_sample, "max_tokens": preset.max_tokens,
        "vocab_size": preset.vocab_size, "dropout": preset.dropout,
        "estep_tokens": config.estep_tokens, "estep_dtype": config.estep_dtype,
        "steps": config.steps,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    result.update(measure_training(config, preset, device, all_threads=all_threads))
    if config.eval_sample:
        result.update(measure_eval_and_sample(config, preset, device))
    return result


# ----------------------------------------------------------------------------- command line


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchConfig.__dataclass_fields__
    parser.add_argument("--preset", choices=tuple(BENCH_PRESETS), default=None,
                        help="tiny (CPU-sized) or seed (the README's hMoEup K=10 transformer_lm "
                             "T=512 max-tokens 3584; for a GPU); default: seed on CUDA, else tiny")
    parser.add_argument("--method", choices=METHODS, default=d["method"].default,
                        help="training method of the timed step (default: %(default)s)")
    parser.add_argument("--num-experts", type=int, default=None, help="K (default: the preset's)")
    parser.add_argument("--steps", type=int, default=d["steps"].default,
                        help="timed steps per side; the median is reported (default: %(default)s)")
    parser.add_argument("--device", default=d["device"].default,
                        help="auto (cuda if available), cpu, cuda[:N]")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile moelab's model (falls back to eager if it fails)")
    parser.add_argument("--estep-tokens", type=int, default=None, metavar="M",
                        help="E-step responsibilities from the first M tokens of each chunk")
    parser.add_argument("--estep-dtype", choices=tuple(ESTEP_DTYPES), default=None,
                        help="E-step under autocast to this dtype (training stays as it is)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU, see threads_N_vs_1)")
    parser.add_argument("--no-reference", action="store_false", dest="reference",
                        help="time moelab's step only (ratio null): e.g. peak memory at large K")
    parser.add_argument("--no-techniques", action="store_false", dest="techniques",
                        help="skip timing each technique on its own")
    parser.add_argument("--no-eval-sample", action="store_false", dest="eval_sample",
                        help="skip the eval-lm and sampling figures")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON line to this file")


def run_bench(args: argparse.Namespace) -> int:
    config = BenchConfig(preset=args.preset, method=args.method, num_experts=args.num_experts,
                         steps=args.steps, device=args.device, compile=args.compile,
                         estep_tokens=args.estep_tokens, estep_dtype=args.estep_dtype,
                         threads=args.threads, reference=args.reference, techniques=args.techniques,
                         eval_sample=args.eval_sample)
    result = run_benchmark(config)
    line = json.dumps(result)
    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(line + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moelab bench", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

