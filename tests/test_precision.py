"""One precision whatever the device: the E-step and validation are float32 unless a flag says
otherwise, the M-step's precision is recorded, and CUDA computes what the CPU computes.

bf16 autocast on the CPU stands in for CUDA's in the CPU tests: the code paths are the same
(autocast's state is read per device type). The tests marked `cuda` run only where CUDA is.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_em import make_batch, make_model

from moelab.data import BinarizedDataset
from moelab.eval.lm import evaluate
from moelab.generate import GenerationConfig, generate
from moelab.train import load_checkpoint, train
from moelab.train.config import TrainConfig
from moelab.train.method import Method
from moelab.train.objectives import em_step
from moelab.train.scoring import ExpertScorer
from moelab.train.trainer import valid_batches

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_estep_is_float32_inside_the_m_steps_bf16_autocast():
    model = make_model(K=3).eval()
    batch = make_batch()
    plain = em_step(ExpertScorer(model), batch, Method.parse("hMoElp"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = em_step(ExpertScorer(model), batch, Method.parse("hMoElp"))
        low = em_step(ExpertScorer(model, estep_dtype=torch.bfloat16), batch,
                      Method.parse("hMoElp"))
    # the responsibilities are the float32 ones, bit for bit; only the M-step's loss is bf16
    torch.testing.assert_close(mixed.responsibilities, plain.responsibilities, rtol=0, atol=0)
    assert mixed.loss.item() != plain.loss.item()
    # ... unless --estep-dtype asks for bf16
    assert not torch.equal(low.responsibilities, plain.responsibilities)


def test_soft_em_does_not_read_its_estep_off_a_bf16_m_step():
    model = make_model(K=3).eval()  # dropout-free: reusing the M-step's scores would be exact
    batch = make_batch()
    plain = em_step(ExpertScorer(model), batch, Method.parse("sMoEup"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = em_step(ExpertScorer(model), batch, Method.parse("sMoEup"))
        with pytest.raises(ValueError, match="autocast"):
            em_step(ExpertScorer(model, reuse_estep=True), batch, Method.parse("sMoEup"))
    torch.testing.assert_close(mixed.responsibilities, plain.responsibilities, rtol=0, atol=0)


def test_an_fp16_estep_inside_the_m_steps_bf16_autocast_keeps_to_its_own_dtype():
    """autocast caches its weight casts until the outermost autocast exits: an fp16 E-step
    inside a bf16 M-step must not hand the M-step fp16 weights (it was a dtype error)."""
    model = make_model(K=3).train()
    batch = make_batch()
    scorer = ExpertScorer(model, estep_dtype=torch.float16)
    alone = em_step(scorer, batch, Method.parse("hMoEup"))  # M-step float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = em_step(scorer, batch, Method.parse("hMoEup"))
    mixed.loss.backward()
    torch.testing.assert_close(mixed.responsibilities, alone.responsibilities, rtol=0, atol=0)
    assert mixed.loss.item() != alone.loss.item()  # the M-step did run in bf16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_precision_flag_is_checked():
    with pytest.raises(ValueError, match="--precision"):
        TrainConfig(max_update=1, precision="float16")


@pytest.fixture(scope="module")
def bf16_run(tiny_bin, tmp_path_factory):
    """Two soft-EM updates with a bf16 M-step on the CPU, validated at the end."""
    save_dir = tmp_path_factory.mktemp("bf16-run")
    return train(str(tiny_bin), arch="tiny", method="sMoEup", num_experts=2, max_update=2,
                 decoder_layers=1, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                 tokens_per_sample=32, max_tokens=256, warmup_updates=1, dropout=0.0,
                 precision="bfloat16", save_dir=str(save_dir), device="cpu",
                 progress_bar=False)


def test_validation_is_float32_when_training_is_bf16(bf16_run, tiny_bin):
    """checkpoint_best is chosen on the float32 number eval-lm would report."""
    model = bf16_run.model.eval()
    valid = valid_batches(BinarizedDataset(tiny_bin, "valid"), bf16_run.config)
    total, tokens = 0.0, 0
    with torch.no_grad():  # the soft objective per token, written out, in float32
        for position in range(valid.batches_per_epoch):
            batch = valid.batch(1, position)
            ll = model.expert_log_likelihoods(batch.tokens, batch.lengths)  # (B, 2) float32
            total -= float(torch.logsumexp(ll - math.log(2), dim=-1).double().sum())
            tokens += batch.num_tokens
    # a near-uniform tiny model moves little under bf16 (about 1e-6), so the match is tight:
    # 2e-7 leaves room for float32 sums per batch only
    assert bf16_run.valid.loss == pytest.approx(total / tokens, rel=2e-7)
    checkpoint = torch.load(bf16_run.save_dir / "checkpoint_best.pt", weights_only=True)
    assert checkpoint["best_valid_loss"] == pytest.approx(total / tokens, rel=2e-7)


def test_precision_is_recorded_in_the_run(bf16_run, ckpt):
    assert bf16_run.config.train.precision == "bfloat16"
    _, _, config = load_checkpoint(bf16_run.save_dir / "checkpoint_best.pt")
    assert config.train.precision == "bfloat16"
    _, _, config = load_checkpoint(ckpt)  # trained with the default, auto, on the CPU
    assert config.train.precision == "float32"


def test_eval_lm_scores_in_float32_even_inside_a_callers_autocast(model, tiny_bin):
    test = BinarizedDataset(tiny_bin, "test")
    plain = evaluate(model, test, context_window=16, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = evaluate(model, test, context_window=16, progress=False)
    assert plain.summary["precision"] == inside.summary["precision"] == "float32"
    assert plain.perplexity.equals(inside.perplexity)


# --------------------------------------------------------------------------- CUDA against CPU
# Tolerances: float32 on both devices differs only by summation order and TF32-free matmuls,
# so log-likelihoods of ~100-token chunks agree to 1e-3 nats (relative 1e-5); the bf16 M-step's
# loss agrees with the CPU's float32 one to 2% (bf16 keeps 8 bits of mantissa).


@cuda
@pytest.mark.cuda
def test_em_step_on_cuda_matches_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_model(K=3).eval()
    batch = make_batch()
    cpu = em_step(ExpertScorer(model), batch, Method.parse("sMoElp"))
    gpu_model = make_model(K=3).eval().cuda()
    gpu_batch = type(batch)(*(t.cuda() for t in (batch.tokens, batch.lengths, batch.context,
                                                 batch.context_lengths)))
    gpu = em_step(ExpertScorer(gpu_model), gpu_batch, Method.parse("sMoElp"))
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gpu.responsibilities.cpu(), cpu.responsibilities,
                               rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the default CUDA M-step
        mixed = em_step(ExpertScorer(gpu_model), gpu_batch, Method.parse("sMoElp"))
    torch.testing.assert_close(mixed.responsibilities.cpu(), cpu.responsibilities,
                               rtol=1e-4, atol=1e-4)  # the E-step stays float32
    assert abs(mixed.loss.item() - cpu.loss.item()) <= 0.02 * abs(cpu.loss.item())


@cuda
@pytest.mark.cuda
def test_eval_lm_and_greedy_generation_on_cuda_match_the_cpu(model, tiny_bin):
    torch.backends.cuda.matmul.allow_tf32 = False
    test = BinarizedDataset(tiny_bin, "test")
    cpu = evaluate(model.cpu(), test, context_window=16, progress=False)
    tokenizer = test.tokenizer()
    greedy = GenerationConfig(sampling=False, max_new_tokens=24)
    cpu_text = generate(model, tokenizer, "the", expert=1, config=greedy)
    gpu = evaluate(model.cuda(), test, context_window=16, progress=False)
    gpu_text = generate(model, tokenizer, "the", expert=1, config=greedy)
    model.cpu()
    cpu_ppl = cpu.perplexity.to_numpy(dtype=float)
    gpu_ppl = gpu.perplexity.to_numpy(dtype=float)
    assert abs(gpu_ppl - cpu_ppl).max() <= 1e-4 * abs(cpu_ppl).max()
    assert gpu_text == cpu_text
