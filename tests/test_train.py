"""The trainer: schedule, configs and flags, gradient accumulation, the seed command, clustering."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moelab.cli import main
from moelab.data import BinarizedDataset, TrainBatches, collate
from moelab.model import MixtureLM
from moelab.train import RunConfig, read_history, train
from moelab.train.config import ModelArgs, OptimConfig, TrainConfig, model_config
from moelab.train.distributed import DistInfo
from moelab.train.schedule import inverse_sqrt_lr
from moelab.train.trainer import (
    EMStep,
    autocast_context,
    build_optimizer,
    train_step,
)

# A tiny model and small batches: each update takes milliseconds on a CPU.
TINY = dict(arch="tiny", decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
            decoder_attention_heads=4, tokens_per_sample=64, max_tokens=512, device="cpu",
            progress_bar=False)


# --------------------------------------------------------------------------- schedule


def test_inverse_sqrt_warmup_then_decay_without_a_floor():
    kw = dict(lr=1e-3, warmup_updates=100, warmup_init_lr=1e-7)
    assert inverse_sqrt_lr(0, **kw) == pytest.approx(1e-7)
    assert inverse_sqrt_lr(50, **kw) == pytest.approx(1e-7 + 50 * (1e-3 - 1e-7) / 100)
    assert inverse_sqrt_lr(100, **kw) == pytest.approx(1e-3)
    assert inverse_sqrt_lr(400, **kw) == pytest.approx(1e-3 * math.sqrt(100 / 400))
    assert inverse_sqrt_lr(10**8, **kw) == pytest.approx(1e-3 * math.sqrt(100 / 10**8))
    lrs = [inverse_sqrt_lr(u, **kw) for u in range(300)]
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 100


def test_inverse_sqrt_without_warmup_and_fairseq_default_init():
    assert inverse_sqrt_lr(0, lr=1e-3, warmup_updates=0, warmup_init_lr=1e-3) == 1e-3
    assert inverse_sqrt_lr(4, lr=1e-3, warmup_updates=0, warmup_init_lr=1e-3) == 5e-4
    assert OptimConfig(warmup_init_lr=-1).warmup_init_lr == 0.0  # fairseq's -1: start from 0
    assert OptimConfig(warmup_init_lr=-1, warmup_updates=0).warmup_init_lr == 1e-3 * 0.7


# --------------------------------------------------------------------------- configs and flags


def test_configs_validate_with_actionable_messages():
    assert ModelArgs(method="dense").num_experts == 1
    assert ModelArgs(method="sMoEup").num_experts == 3
    assert ModelArgs(method="hMoElp").mean_pool_gating_network is True
    with pytest.raises(ValueError, match="dense .* one expert"):
        ModelArgs(method="dense", num_experts=4)
    with pytest.raises(ValueError, match="gating network"):
        ModelArgs(method="sMoElp", mean_pool_gating_network=False)
    with pytest.raises(ValueError, match="valid methods"):
        ModelArgs(method="hMoE")
    with pytest.raises(ValueError, match="--optimizer sgd is not supported"):
        OptimConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="--lr-scheduler cosine"):
        OptimConfig(lr_scheduler="cosine")
    with pytest.raises(ValueError, match="--criterion"):
        TrainConfig(criterion="label_smoothed_cross_entropy", max_update=1)
    with pytest.raises(ValueError, match="--max-update"):
        TrainConfig()
    with pytest.raises(ValueError, match="unknown training option 'lrr'"):
        RunConfig.from_kwargs("bin", lrr=1.0, max_update=1)


def test_model_config_from_preset_and_overrides():
    args = ModelArgs(arch="tiny", method="hMoElp", num_experts=5, decoder_embed_dim=64,
                     mean_pool_gating_network_encoder_dim=32, dropout=0.2)
    c = model_config(args, vocab_size=300, pad_id=3, tokens_per_sample=96)
    assert (c.vocab_size, c.num_experts, c.n_embd, c.n_layer, c.max_seq_len) == (300, 5, 64, 2, 96)
    assert (c.gating, c.gating_dim, c.dropout, c.pad_id) == (True, 32, 0.2, 3)
    up = model_config(ModelArgs(arch="tiny", mean_pool_gating_network=True), vocab_size=300,
                      pad_id=3, tokens_per_sample=96)
    assert up.gating is False  # a uniform prior builds no gating network


def _parse(argv):
    from moelab.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_flags_share_the_dataclass_defaults():
    from moelab.train.command import config_from_args

    assert config_from_args(_parse(["bin", "--max-update", "5"])) == RunConfig.from_kwargs(
        "bin", max_update=5)
    args = _parse(["bin", "--max-update", "5", "--adam-betas", "(0.9, 0.99)", "--lr", "0.001",
                   "--mean-pool-gating-network", "--batch-size", "8", "--no-progress-bar",
                   "--no-share-decoder-input-output-embed"])
    config = config_from_args(args)
    assert config.optim.adam_betas == (0.9, 0.99) and config.optim.lr == 1e-3
    assert config.data.max_sentences == 8 and config.train.progress_bar is False
    assert config.model.share_decoder_input_output_embed is False


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "bin", "--max-update", "1", "--no-such-flag"])
    assert e.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--optimizer", "sgd", "--optimizer sgd is not supported"),
    ("--lr-scheduler", "cosine", "--lr-scheduler cosine is not supported"),
    ("--criterion", "label_smoothed_cross_entropy", "--criterion label_smoothed"),
    ("--task", "translation", "--task translation is not supported"),
])
def test_unsupported_fairseq_choices_are_clear_errors(tiny_bin, flag, value, message, capsys):
    assert main(["train", str(tiny_bin), "--max-update", "1", flag, value]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- one update


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_update_freq_gives_the_gradient_of_the_merged_batch(tiny_bin):
    """Two micro-batches accumulated == one batch holding both (dropout off, fp32)."""
    ds = BinarizedDataset(tiny_bin, "train")
    chunks = ds.chunks(64)
    first, second = chunks[:3], chunks[10:15]  # different lengths and documents

    def gradient(micro_chunks, method):
        torch.manual_seed(0)
        config = RunConfig.from_kwargs(str(tiny_bin), max_update=1, method=method,
                                       dropout=0.0, **TINY)
        mconf = model_config(config.model, vocab_size=ds.vocab_size, pad_id=ds.pad_id,
                             tokens_per_sample=64)
        model = MixtureLM(mconf)
        optimizer = build_optimizer(model, config, torch.device("cpu"))
        hard, uniform = (method.startswith("h"), method.endswith("up"))
        batches = [collate(ds, c, 64) for c in micro_chunks]
        train_step(EMStep(model, hard=hard, uniform_prior=uniform), batches, optimizer,
                   dist=DistInfo(), clip_norm=0.0, autocast=autocast_context(torch.device("cpu")))
        return _grads(model)

    for method in ("hMoEup", "sMoElp"):
        split = gradient([first, second], method)
        merged = gradient([first + second], method)
        assert split.keys() == merged.keys()
        for name in split:
            torch.testing.assert_close(split[name], merged[name], atol=1e-6, rtol=1e-4,
                                       msg=f"{method}: gradient of {name}")


# --------------------------------------------------------------------------- runs


def test_train_logs_history_and_calls_back(tiny_bin, tmp_path):
    logs, evals = [], []
    result = train(tiny_bin, method="sMoElp", num_experts=2, max_update=6, log_interval=2,
                   validate_interval_updates=3, save_dir=tmp_path, on_log=logs.append,
                   on_eval=evals.append, **TINY)
    assert [r["update"] for r in logs] == [2, 4, 6] and [r["update"] for r in evals] == [3, 6]
    history = read_history(tmp_path)
    train_rows = history[history.kind == "train"]
    assert list(train_rows["update"]) == [2, 4, 6]
    for column in ("loss", "nll", "ppl", "lr", "grad_norm", "tokens_per_s", "usage_entropy",
                   "epoch", "wall", "posterior_mass_0", "posterior_mass_1"):
        assert train_rows[column].notna().all(), column
    masses = train_rows[["posterior_mass_0", "posterior_mass_1"]].sum(axis=1)
    np.testing.assert_allclose(masses, 1.0, atol=1e-5)
    assert np.allclose(train_rows.ppl, np.exp(train_rows.loss))
    valid = history[history.kind == "valid"]
    assert list(valid["update"]) == [3, 6]
    assert result.valid.loss == pytest.approx(valid.loss.iloc[-1])
    assert result.valid.ppl == pytest.approx(math.exp(result.valid.loss))
    assert result.valid.posterior.shape == (len(BinarizedDataset(tiny_bin, "valid")), 2)
    assert (tmp_path / "checkpoint_best.pt").is_file()
    assert (tmp_path / "checkpoint_last.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_validation_is_deterministic_and_matches_the_soft_objective(tiny_bin, tmp_path):
    """Valid loss for soft EM is the marginal NLL per token: recompute it by hand."""
    from moelab.train.trainer import valid_batches, validate

    result = train(tiny_bin, method="sMoEup", num_experts=2, max_update=2, save_dir=tmp_path,
                   **TINY)
    model, config = result.model, result.config
    ds = BinarizedDataset(tiny_bin, "valid")
    again = validate(model, valid_batches(ds, config), DistInfo(), hard=False)
    assert again.loss == result.valid.loss
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in TrainBatches(ds, tokens_per_sample=64, max_tokens=512, shuffle=False):
            ll = model.expert_log_likelihoods(batch.tokens, batch.lengths)
            total -= torch.logsumexp(ll - math.log(2), dim=-1).sum().item()
            tokens += batch.num_tokens
    assert again.loss == pytest.approx(total / tokens, rel=1e-5)


SEED_COMMAND = """
--ddp-backend='no_c10d'  DATA_BIN
--max-update 100000
--task language_model_moe
--user-dir examples/language_model_moe/src
--method hMoEup
--arch transformer_lm
--share-decoder-input-output-embed
--optimizer adam
--adam-betas '(0.9, 0.98)'
--clip-norm 0.0
--lr-scheduler inverse_sqrt
--warmup-init-lr 1e-07
--warmup-updates 4000
--lr 0.0007
--min-lr 1e-09
--dropout 0.1
--weight-decay 0.0
--criterion cross_entropy
--max-tokens 3584
--num-experts 10
--mean-pool-gating-network
--mean-pool-gating-network-encoder-dim 512
--mean-pool-gating-network-dropout 0.0
"""
# Only flags that shrink the run (later flags win in argparse).
SHRINK = ("--max-update 3 --decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 128 "
          "--decoder-attention-heads 4 --tokens-per-sample 64 --max-tokens 1024")


def test_the_seed_train_command_runs(tiny_bin, tmp_path, monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(tmp_path)  # the default --save-dir is ./checkpoints, as in fairseq
    argv = shlex.split(SEED_COMMAND.replace("DATA_BIN", str(tiny_bin))) + SHRINK.split()
    assert main(["train", *argv]) == 0
    err = capsys.readouterr().err
    for fragment in ("--ddp-backend=no_c10d is ignored", "--task is not needed",
                     "--user-dir examples/language_model_moe/src is ignored",
                     "--mean-pool-gating-network is unused with --method hMoEup"):
        assert fragment in err
    lines = [json.loads(x) for x in (tmp_path / "checkpoints/train_log.jsonl").read_text()
             .splitlines()]
    assert lines[-1]["kind"] == "valid" and lines[-1]["update"] == 3
    assert len(lines[-1]["posterior_mass"]) == 10
    assert (tmp_path / "checkpoints/checkpoint_last.pt").is_file()


# --------------------------------------------------------------------------- cluster recovery


@pytest.mark.slow
def test_hard_em_recovers_the_three_domains(tiny_bin, tmp_path):
    """hMoEup with K=3 on 3 synthetic domains: argmax posterior per valid document ~ domain."""
    from sklearn.metrics import normalized_mutual_info_score

    result = train(tiny_bin, **CLUSTER_RECOVERY, save_dir=tmp_path)
    clusters = result.valid.posterior.argmax(1)
    nmi = normalized_mutual_info_score(result.valid.domain_ids, clusters)
    assert nmi >= 0.8, f"NMI {nmi:.3f}; posterior mass {result.valid.posterior.mean(0)}"
    assert result.valid.nmi == pytest.approx(nmi)


CLUSTER_RECOVERY = dict(
    arch="tiny", method="hMoEup", num_experts=3, decoder_layers=2, decoder_embed_dim=64,
    decoder_ffn_embed_dim=256, tokens_per_sample=128, max_tokens=2048, max_update=150,
    warmup_updates=20, lr=3e-3, log_interval=50, device="cpu", progress_bar=False,
)
