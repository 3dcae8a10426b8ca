"""`moelab bench`: training, eval-lm and sampling speed vs a fairseq-style reference, in one run.

Training. moelab's step is `moelab.train.trainer.train_step`, exactly what `moelab train` runs;
the reference is moelab.bench.reference's fairseq-style step. Both start from the same weights
and see the same batch; their steps alternate, and the median step time of each is reported, so
a busy machine slows both alike. The `ratio` is reference time / moelab time.

Techniques. Each speed-up is also measured on its own, in the same run (moelab.bench.techniques).

MFU, FLOPs and memory: moelab.bench.harness says how they are counted.

The whole result is one JSON line (`run_bench`); its keys are what the READMEs cite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelab.bench.harness import (
    PEAK_FLOPS,
    BenchConfig,
    adam,
    bench_model,
    estep_options,
    peak_memory_bytes,
    reset_peak_memory,
    sync,
    synthetic_batch,
    synthetic_bin,
    timed,
)
from moelab.bench.reference import reference_step
from moelab.bench.techniques import measure_techniques
from moelab.model import MixtureLM
from moelab.presets import BENCHMARKS, BenchmarkPreset
from moelab.train.distributed import DistInfo
from moelab.train.method import METHODS, Method
from moelab.train.scoring import ESTEP_DTYPES
from moelab.train.update import EMStep, autocast_context, train_step


def measure_training(config: BenchConfig, preset: BenchmarkPreset, device: torch.device, *,
                     all_threads: int = 1) -> dict:
    """moelab's training step against the reference: tokens/s, ratio, FLOPs, MFU, memory."""
    method = Method.parse(config.method)
    batch = synthetic_batch(rows=max(1, preset.max_tokens // preset.tokens_per_sample),
                            seq_len=preset.tokens_per_sample, vocab_size=preset.vocab_size,
                            pad_id=3, generator=torch.Generator().manual_seed(0))
    on_device = batch.to(device)
    dist = DistInfo(device=device)

    model = bench_model(config, preset, device, dropout=preset.dropout)
    compile_info = None
    if config.compile:
        active = model.compile_for_speed()
        compile_info = {"requested": True, "active": active}
    optimizer = adam(model, device)
    step_module = EMStep(model, method, **estep_options(config))
    autocast = autocast_context(device)
    if config.reference:
        ref_model = bench_model(config, preset, device, dropout=preset.dropout)
        ref_optimizer = torch.optim.Adam(ref_model.parameters(), lr=1e-4)

    def ours() -> None:
        train_step(step_module, [batch], optimizer, dist=dist, clip_norm=0.0, autocast=autocast)

    def reference() -> None:
        reference_step(ref_model, on_device, ref_optimizer, method)

    ours()  # warm up (and compile) before the memory high-water mark is taken
    reset_peak_memory(device)
    ours()
    peak = peak_memory_bytes(device)
    t_ref = ref_peak = None
    if config.reference:
        reset_peak_memory(device)
        reference()
        ref_peak = peak_memory_bytes(device)
        t_ours, t_ref = timed([ours, reference], config.steps, device)
    else:
        (t_ours,) = timed([ours], config.steps, device, warmup=0)  # warmed up above
    tokens = batch.num_tokens
    # the FLOPs of the step as timed (under its autocast, which decides whether the E-step is
    # read off the M-step's forward): the count `moelab train` logs
    with autocast():
        flops = step_module.flops(batch)
    if compile_info is not None:
        body = model.scoring.body  # a CompiledOrEager: it may have fallen back since
        compile_info.update(active=body.active, error=body.error)
    result = {
        "batch_rows": int(batch.tokens.shape[0]), "batch_tokens": tokens,
        "tokens_per_s": round(tokens / t_ours, 1),
        "reference_tokens_per_s": round(tokens / t_ref, 1) if t_ref else None,
        "ratio": round(t_ref / t_ours, 3) if t_ref else None,
        "step_s": round(t_ours, 4), "reference_step_s": round(t_ref, 4) if t_ref else None,
        "flops_per_token": flops.total / tokens,
        "flops_by_part": flops.as_dict(),
        "mfu": round(flops.total / t_ours / PEAK_FLOPS, 4) if device.type == "cuda" else None,
        "peak_memory_bytes": peak, "reference_peak_memory_bytes": ref_peak,
        "compile": compile_info,
    }
    if config.techniques:
        result["techniques"] = measure_techniques(config, preset, on_device, device,
                                                  all_threads=all_threads)
    return result


def measure_eval_and_sample(config: BenchConfig, preset: BenchmarkPreset, device: torch.device,
                            *, new_tokens: int = 128, repeat: int = 2) -> dict:
    """eval-lm document tokens per second (all K experts) and sampling with/without KV cache."""
    from moelab.data import BinarizedDataset
    from moelab.eval.lm import evaluate
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
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
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
    preset = BENCHMARKS[config.preset]
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
    parser.add_argument("--preset", choices=tuple(BENCHMARKS), default=None,
                        help="tiny (CPU-sized) or fairseq (the original workflow's hMoEup: K=10, "
                             "transformer_lm, T=512, max-tokens 3584; for a GPU); default: "
                             "fairseq on CUDA, else tiny")
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

