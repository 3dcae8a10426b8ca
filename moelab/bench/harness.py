"""What every `moelab bench` measurement shares: presets, model, batch, timing, memory, FLOPs.

MFU (CUDA only; null on CPU): the timed step's model FLOPs, counted by moelab.train.compute
(the count `moelab train` logs as train_flops), times steps per second, over 989.4e12 (the
H200's dense bf16 peak, used as the anchor on every GPU).

Memory: `peak_memory_bytes` is torch.cuda.max_memory_allocated over moelab's timed steps; on CPU
the process's resident-set high-water mark (VmHWM of /proc/self/status, reset before the steps
where the kernel allows it).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.data import Batch
from moelab.model import MixtureLM
from moelab.presets import BENCHMARKS, BenchmarkPreset
from moelab.train.config import ModelArgs, model_config
from moelab.train.method import Method
from moelab.train.scoring import ESTEP_DTYPES

# The MFU denominator: the H200's (SXM, = H100 SXM) dense bf16 tensor-core peak, 132 SMs x
# 4,096 FLOP per clock per SM x 1.83 GHz = 989.4 TFLOPS (NVIDIA's datasheet figure without
# sparsity; 1,979 with 2:4 sparsity).
PEAK_FLOPS = 989.4e12


@dataclass
class BenchConfig:
    preset: str | None = None  # BENCHMARKS name; None: fairseq on CUDA, tiny on CPU
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
            self.preset = "fairseq" if self.device.startswith("cuda") else "tiny"
        if self.preset not in BENCHMARKS:
            raise ValueError(f"unknown --preset {self.preset!r}; choose from "
                             f"{', '.join(BENCHMARKS)}")
        Method.parse(self.method)  # raises with the valid names
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.estep_tokens is not None and self.estep_tokens < 1:
            raise ValueError(f"--estep-tokens must be >= 1, got {self.estep_tokens}")
        if self.estep_dtype not in (None, *ESTEP_DTYPES):
            raise ValueError(f"--estep-dtype must be one of {', '.join(ESTEP_DTYPES)}")


# ----------------------------------------------------------------------------- model and inputs


def bench_model(config: BenchConfig, preset: BenchmarkPreset, device: torch.device, *,
                dropout: float) -> MixtureLM:
    """The benchmark's model, in training mode, from the same seed every time (same weights)."""
    margs = ModelArgs(arch=preset.arch, method=config.method, dropout=dropout,
                      num_experts=1 if config.method == "dense"
                      else config.num_experts or preset.num_experts)
    mconf = model_config(margs, vocab_size=preset.vocab_size, pad_id=3,
                         tokens_per_sample=preset.tokens_per_sample)
    torch.manual_seed(0)
    return MixtureLM(mconf).to(device).train()


def adam(model: MixtureLM, device: torch.device, *, fused: bool | None = None
         ) -> torch.optim.Adam:
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)


def estep_options(config: BenchConfig) -> dict:
    """The E-step options of moelab's timed step, as EMStep and ExpertScorer take them."""
    return {"estep_tokens": config.estep_tokens,
            "estep_dtype": ESTEP_DTYPES[config.estep_dtype] if config.estep_dtype else None}


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


# ----------------------------------------------------------------------------- timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: list[Callable[[], object]], steps: int, device: torch.device,
          warmup: int = 1) -> list[float]:
    """Median seconds per call of each function; the functions alternate, call by call.

    Alternating means a busy machine slows all of them alike; the median drops the calls
    another process interrupted.
    """
    def one(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[one(fn) for fn in fns] for _ in range(steps)]
    return [statistics.median(t[i] for t in times) for i in range(len(fns))]


def reset_peak_memory(device: torch.device) -> None:
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
