"""The trainer: schedule, configs, gradient accumulation, fairseq's command, clustering."""

from __future__ import annotations

import dataclasses
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
from moelab.train.method import Method
from moelab.train.schedule import inverse_sqrt_lr
from moelab.train.update import (
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
        batches = [collate(ds, c, 64) for c in micro_chunks]
        train_step(EMStep(model, Method.parse(method)), batches, optimizer,
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
    # soft EM: the reported loss IS the marginal NLL; the values themselves are recomputed by
    # hand in test_train_log_reports_the_first_batchs_objective (hard EM, where loss != nll)
    np.testing.assert_allclose(train_rows.loss, train_rows.nll, rtol=1e-6)
    assert np.allclose(train_rows.ppl, np.exp(train_rows.loss))
    valid = history[history.kind == "valid"]
    assert list(valid["update"]) == [3, 6]
    assert result.valid.loss == pytest.approx(valid.loss.iloc[-1])
    assert result.valid.ppl == pytest.approx(math.exp(result.valid.loss))  # see also
    # test_hard_validation_loss_is_recomputed_by_hand: the loss itself, independently
    assert result.valid.posterior.shape == (len(BinarizedDataset(tiny_bin, "valid")), 2)
    assert (tmp_path / "checkpoint_best.pt").is_file()
    assert (tmp_path / "checkpoint_last.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_validation_is_deterministic_and_matches_the_soft_objective(tiny_bin, tmp_path):
    """Valid loss for soft EM is the marginal NLL per token: recompute it by hand."""
    from moelab.train.trainer import valid_batches
    from moelab.train.validation import validate

    result = train(tiny_bin, method="sMoEup", num_experts=2, max_update=2, save_dir=tmp_path,
                   **TINY)
    model, config = result.model, result.config
    ds = BinarizedDataset(tiny_bin, "valid")
    again = validate(model, valid_batches(ds, config), DistInfo(), Method.parse("sMoEup"))
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


# --------------------------------------------------------------------------- what the trainer does
# Each test below was checked against the break its name describes (see the commit message).

FAST = dict(TINY, method="hMoEup", num_experts=2, dropout=0.0)


@pytest.mark.usefixtures("one_thread")
def test_restore_file_loads_the_checkpoints_weights_bit_for_bit(tiny_bin, tmp_path,
                                                               monkeypatch):
    """--restore-file from another --save-dir: the model right after restoring IS the checkpoint.

    The weights are read the moment the restore returns, before any update. A restore that
    skipped `model.load_state_dict` would leave the seed's fresh initialisation, which the
    checkpoint's weights are not.
    """
    from moelab.train import trainer
    from moelab.train.checkpoint import read_checkpoint

    train(tiny_bin, max_update=3, warmup_updates=1, lr=3e-3, save_dir=tmp_path / "a", **FAST)
    saved = read_checkpoint(tmp_path / "a" / "checkpoint_last.pt")["model"]
    restored: dict = {}
    real_restore = trainer.Trainer.restore_with_fallback

    def spying_restore(self, path):
        out = real_restore(self, path)
        restored.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return out

    monkeypatch.setattr(trainer.Trainer, "restore_with_fallback", spying_restore)
    result = train(tiny_bin, max_update=4, warmup_updates=1, lr=3e-3, save_dir=tmp_path / "b",
                   restore_file=str(tmp_path / "a" / "checkpoint_last.pt"), **FAST)
    assert result.num_updates == 4  # 3 restored + 1 trained
    assert restored.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(restored[name], tensor), name
    # the checkpoint is not the initialisation (else the comparison above proves nothing)
    torch.manual_seed(result.config.train.seed)
    fresh = MixtureLM(result.model_config).state_dict()
    assert any(not torch.equal(fresh[n], t) for n, t in saved.items() if n in fresh)


@pytest.mark.usefixtures("one_thread")
def test_restoring_a_finished_checkpoint_into_a_new_save_dir_reports(tiny_bin, tmp_path):
    train(tiny_bin, max_update=2, save_dir=tmp_path / "a", **FAST)
    result = train(tiny_bin, max_update=2, save_dir=tmp_path / "b",
                   restore_file=str(tmp_path / "a" / "checkpoint_last.pt"), **FAST)
    assert result.num_updates == 2 and result.valid is not None
    assert result.history is None  # nothing was trained, so nothing was logged there


def _record_optimizer_lrs(monkeypatch) -> list[list[float]]:
    """Patch the trainer's build_optimizer so each optimizer.step() records its groups' lr."""
    from moelab.train import trainer

    seen: list[list[float]] = []
    real = trainer.build_optimizer

    def recording(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        step = optimizer.step

        def recorded_step(*a, **k):
            seen.append([g["lr"] for g in optimizer.param_groups])
            return step(*a, **k)
        optimizer.step = recorded_step
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", recording)
    return seen


def _fairseq_inverse_sqrt(update: int, *, lr: float, warmup: int, init: float) -> float:
    """fairseq's InverseSquareRootSchedule, written out: the rate of the `update`-th (1-based)
    optimizer step, set from the number of updates done before it."""
    done = update - 1
    if done < warmup:
        return init + done * (lr - init) / warmup
    return lr * (warmup / done) ** 0.5


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("warmup_init_lr, min_lr", [
    (1e-4, 1e-9),  # the usual case
    (-1, 1e-5),  # warmup from 0, below --min-lr at first: no floor lifts it, no stop
])
def test_optimizer_steps_use_the_inverse_sqrt_rate(tiny_bin, tmp_path, monkeypatch,
                                                   warmup_init_lr, min_lr):
    seen = _record_optimizer_lrs(monkeypatch)
    lr, warmup, updates = 1e-3, 5, 12
    result = train(tiny_bin, max_update=updates, lr=lr, warmup_updates=warmup,
                   warmup_init_lr=warmup_init_lr, min_lr=min_lr, log_interval=1,
                   save_dir=tmp_path, **FAST)
    assert result.num_updates == updates
    init = 0.0 if warmup_init_lr < 0 else warmup_init_lr
    expected = [_fairseq_inverse_sqrt(u, lr=lr, warmup=warmup, init=init)
                for u in range(1, updates + 1)]
    assert len(seen) == updates
    for update, (groups, want) in enumerate(zip(seen, expected, strict=True), start=1):
        assert groups == pytest.approx([want] * len(groups), rel=1e-12, abs=0), update
    assert seen[0][0] == init  # exactly: 0 stays 0 with warmup_init_lr -1
    logged = read_history(tmp_path).query("kind == 'train'")
    assert list(logged["update"]) == list(range(1, updates + 1))
    np.testing.assert_allclose(logged["lr"], expected, rtol=1e-12, atol=0)


@pytest.mark.usefixtures("one_thread")
def test_min_lr_stops_training_at_the_update_where_the_rate_reaches_it(tiny_bin, tmp_path,
                                                                      monkeypatch, capsys):
    """fairseq's --min-lr is a stop: lr 1e-3, warmup 4 -> the rate before update u+1 is
    1e-3 * sqrt(4 / u): 7.07e-4 after 8 updates, 6.67e-4 after 9. With --min-lr 6.8e-4 the run
    ends after exactly 9 updates (not at --max-update 14), and no step after the warmup ran at
    or below it (the warmup's rates are lower, and are not a decay)."""
    seen = _record_optimizer_lrs(monkeypatch)
    result = train(tiny_bin, max_update=14, lr=1e-3, warmup_updates=4, warmup_init_lr=1e-7,
                   min_lr=6.8e-4, save_dir=tmp_path, **FAST)
    assert result.num_updates == 9
    assert len(seen) == 9 and min(g[0] for g in seen[4:]) > 6.8e-4
    err = capsys.readouterr().err
    assert "stopped at update 9" in err and "--min-lr" in err
    from moelab.train.checkpoint import read_checkpoint

    assert read_checkpoint(tmp_path / "checkpoint_last.pt")["num_updates"] == 9


@pytest.mark.usefixtures("one_thread")
def test_min_lr_does_not_stop_a_warmup_that_starts_at_zero(tiny_bin, tmp_path, capsys):
    result = train(tiny_bin, max_update=3, lr=1e-3, warmup_updates=2, warmup_init_lr=-1,
                   min_lr=1e-4, save_dir=tmp_path, **FAST)
    assert result.num_updates == 3
    assert "--min-lr" not in capsys.readouterr().err


def _one_parameter(value: torch.Tensor) -> torch.nn.Module:
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(value.clone())
    return module


def test_adam_weight_decay_is_decoupled_as_fairseq():
    """Two steps of build_optimizer's optimizer == AdamW written out by hand (float64), and
    != Adam with the decay added to the gradient (L2), which is what torch's Adam does."""
    lr, wd, (b1, b2), eps = 0.1, 0.5, (0.9, 0.98), 1e-8
    config = RunConfig.from_kwargs("bin", max_update=1, lr=lr, weight_decay=wd,
                                   adam_betas=(b1, b2), adam_eps=eps)
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(7, generator=gen, dtype=torch.float64)
    grads = [torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(2)]

    def by_hand(decoupled: bool) -> torch.Tensor:
        p, m, v = p0.clone(), torch.zeros(7, dtype=torch.float64), torch.zeros(7,
                                                                             dtype=torch.float64)
        for t, g in enumerate(grads, start=1):
            if not decoupled:
                g = g + wd * p  # L2: the decay goes through Adam's moments
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            p = p - lr * m_hat / (v_hat.sqrt() + eps) - (lr * wd * p if decoupled else 0)
        return p

    module = _one_parameter(p0)
    optimizer = build_optimizer(module, config, torch.device("cpu"))
    for g in grads:
        module.w.grad = g.clone()
        optimizer.step()
    got = module.w.detach()
    torch.testing.assert_close(got, by_hand(decoupled=True), rtol=1e-12, atol=1e-12)
    assert (got - by_hand(decoupled=False)).abs().max() > 1e-3


def _clip_setup(tiny_bin):
    ds = BinarizedDataset(tiny_bin, "train")
    config = RunConfig.from_kwargs(str(tiny_bin), max_update=1, **FAST)
    mconf = model_config(config.model, vocab_size=ds.vocab_size, pad_id=ds.pad_id,
                         tokens_per_sample=64)
    torch.manual_seed(0)
    model = MixtureLM(mconf)
    batch = collate(ds, ds.chunks(64)[:6], 64)
    return model, batch


def _sgd_step(model, batch, clip_norm):
    """train_step with plain SGD (lr 1): the gradient it steps with and the weight change."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = train_step(EMStep(model, Method.parse("hMoEup")), [batch], optimizer,
                       dist=DistInfo(), clip_norm=clip_norm,
                       autocast=autocast_context(torch.device("cpu")))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    change = {n: (before[n] - p.detach()).double() for n, p in model.named_parameters()}
    return stats, grads, change


def _norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double())
                                                       for t in tensors])))


@pytest.mark.usefixtures("one_thread")
def test_clip_norm_clips_the_update_and_logs_the_norm_before_clipping(tiny_bin):
    import copy

    model, batch = _clip_setup(tiny_bin)
    twin = copy.deepcopy(model)
    free_stats, free_grads, free_change = _sgd_step(twin, batch, clip_norm=0.0)  # no clipping
    full_norm = _norm(free_grads.values())
    assert full_norm > 0.1  # so that clipping to 1e-3 is a real cut
    assert float(free_stats.grad_norm) == pytest.approx(full_norm, rel=1e-4)
    assert _norm(free_change.values()) == pytest.approx(full_norm, rel=1e-3)

    clip = 1e-3
    stats, grads, change = _sgd_step(model, batch, clip_norm=clip)
    assert _norm(grads.values()) == pytest.approx(clip, rel=1e-4)  # clipped to --clip-norm
    # the step moved the weights by the clipped gradient (float32 rounding of w - tiny: loose)
    assert _norm(change.values()) == pytest.approx(clip, rel=0.05)
    for name, g in grads.items():  # the same direction, scaled by clip / norm
        torch.testing.assert_close(g, free_grads[name] * (clip / full_norm), rtol=1e-4,
                                   atol=1e-12, msg=name)
    # the reported grad_norm is the norm BEFORE clipping, as fairseq logs it
    assert float(stats.grad_norm) == pytest.approx(full_norm, rel=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_train_log_reports_the_first_batchs_objective(tiny_bin, tmp_path, monkeypatch):
    """loss, nll and ppl of the first log line, recomputed from the batch and the initial weights.

    hMoEup with K=2: loss = -(log 1/2 + log p(x|z*)) per target token and nll = -log p(x|z*), so
    the two differ by log 2 per chunk, and ppl = exp(loss) (not exp(nll), not 2**loss). Dropout
    is off so the E-step, the M-step and this recomputation see the same function.
    """
    from moelab.train import trainer

    first: dict = {}
    real_step = trainer.train_step

    def spying_step(step_module, micro_batches, optimizer, **kwargs):
        if not first:
            first["state"] = {k: v.clone() for k, v in step_module.model.state_dict().items()}
            first["batches"] = list(micro_batches)
        return real_step(step_module, micro_batches, optimizer, **kwargs)

    monkeypatch.setattr(trainer, "train_step", spying_step)
    result = train(tiny_bin, max_update=1, log_interval=1, save_dir=tmp_path, **FAST)
    record = read_history(tmp_path).query("kind == 'train'").iloc[0]

    model = MixtureLM(result.model_config).eval()
    model.load_state_dict(first["state"])
    loss = nll = 0.0
    tokens = chunks = 0
    with torch.no_grad():
        for batch in first["batches"]:
            ll = model.expert_log_likelihoods(batch.tokens, batch.lengths).double()  # (B, 2)
            best = ll.max(-1).values
            nll -= float(best.sum())
            loss -= float((best - math.log(2)).sum())
            tokens += int(batch.lengths.sum())
            chunks += len(batch)
    assert record["loss"] == pytest.approx(loss / tokens, rel=1e-5)
    assert record["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert record["loss"] - record["nll"] == pytest.approx(chunks * math.log(2) / tokens,
                                                            rel=1e-3)
    assert record["ppl"] == pytest.approx(math.exp(loss / tokens), rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_hard_validation_loss_is_recomputed_by_hand(tiny_bin, tmp_path):
    """The valid loss of hard EM: -(log 1/K + max_z log p(x|z)) per token, over every valid
    chunk; ppl = exp(that). The run's reported figures must match this independent sum."""
    result = train(tiny_bin, max_update=2, warmup_updates=1, lr=3e-3, save_dir=tmp_path, **FAST)
    ds = BinarizedDataset(tiny_bin, "valid")
    loss = nll = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in TrainBatches(ds, tokens_per_sample=64, max_tokens=512, shuffle=False):
            ll = result.model.expert_log_likelihoods(batch.tokens, batch.lengths).double()
            best = ll.max(-1).values
            nll -= float(best.sum())
            loss -= float((best - math.log(2)).sum())
            tokens += batch.num_tokens
    assert result.valid.num_tokens == tokens
    assert result.valid.loss == pytest.approx(loss / tokens, rel=1e-5)
    assert result.valid.nll == pytest.approx(nll / tokens, rel=1e-5)
    assert result.valid.ppl == pytest.approx(math.exp(loss / tokens), rel=1e-5)
    last = read_history(tmp_path).query("kind == 'valid'").iloc[-1]
    assert last["ppl"] == pytest.approx(math.exp(loss / tokens), rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_validation_logs_the_posteriors_confidence_beside_its_nmi(tiny_bin, tmp_path):
    """A flat posterior's NMI is not a clean split: the valid line says how sure it is."""
    result = train(tiny_bin, max_update=2, save_dir=tmp_path, **FAST)
    record = [r for r in read_history(tmp_path).to_dict("records") if r["kind"] == "valid"][-1]
    p = result.valid.posterior  # (documents, K) p(z | document)
    assert record["nmi"] == pytest.approx(result.valid.nmi)
    assert record["mean_max_posterior"] == pytest.approx(float(p.max(1).mean()))
    entropy = -(p * np.log(np.clip(p, 1e-300, None))).sum(1).mean()
    assert record["mean_posterior_entropy"] == pytest.approx(float(entropy))
    assert 0 < record["expert_spread"] < 1  # nats per token: two barely trained experts


# --------------------------------------------------------------------------- config edges


def test_max_bad_updates_below_one_is_refused():
    with pytest.raises(ValueError, match="--max-bad-updates must be >= 1, got 0"):
        TrainConfig(max_update=1, max_bad_updates=0)
    assert TrainConfig(max_update=1, max_bad_updates=1).max_bad_updates == 1


def test_max_tokens_equal_to_tokens_per_sample_is_a_valid_batch_size():
    """One chunk of the longest length fills the batch exactly: that fits."""
    from moelab.train.config import DataConfig

    assert DataConfig(data="bin", max_tokens=64, tokens_per_sample=64).max_tokens == 64
    with pytest.raises(ValueError, match=r"--max-tokens \(63\) must be >= --tokens-per-sample"):
        DataConfig(data="bin", max_tokens=63, tokens_per_sample=64)


# --------------------------------------------------------------------------- validation and meter


@pytest.mark.usefixtures("one_thread")
def test_validate_gives_the_model_back_in_the_mode_it_came_in(tiny_bin):
    """validate runs in eval mode but must not leave a training model there: the next updates
    would run without dropout."""
    from moelab.train.trainer import valid_batches
    from moelab.train.validation import validate

    config = RunConfig.from_kwargs(str(tiny_bin), max_update=1, **FAST)
    ds = BinarizedDataset(tiny_bin, "valid")
    model = MixtureLM(model_config(config.model, vocab_size=ds.vocab_size, pad_id=ds.pad_id,
                                   tokens_per_sample=64))
    batches = valid_batches(ds, config)
    model.train()
    validate(model, batches, DistInfo(), Method.parse("hMoEup"))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    validate(model, batches, DistInfo(), Method.parse("hMoEup"))
    assert not model.training and not any(m.training for m in model.modules())


def test_meter_counts_argmax_wins_apart_from_responsibilities():
    """Usage (argmax counts) and posterior mass (responsibility sums) are different figures:
    soft responsibilities 0.6/0.4 on both chunks are 2 wins for expert 0, not 1.2 and 0.8."""
    from moelab.train.meter import Meter
    from moelab.train.update import StepStats

    meter = Meter(num_experts=2, device=torch.device("cpu"))
    stats = StepStats(loss=torch.tensor(5.0), nll=torch.tensor(4.0), num_tokens=10,
                      global_tokens=10, responsibility_sum=torch.tensor([1.2, 0.8]),
                      argmax_counts=torch.tensor([2, 0]), num_chunks=2,
                      grad_norm=torch.tensor(0.5), posterior_sum=torch.tensor([0.5, 1.5]),
                      scored_chunks=2)
    meter.add(stats)
    meter.add(stats)
    meter.add(dataclasses.replace(stats, posterior_sum=None, scored_chunks=0))  # a warm start's
    sums = meter.sums
    assert sums.responsibility_sum.tolist() == pytest.approx([3.6, 2.4])
    assert sums.argmax_counts.tolist() == [6.0, 0.0]
    assert sums.posterior_sum.tolist() == pytest.approx([1.0, 3.0])
    assert float(sums.scored_chunks) == 4  # the warm start's update scored none
    assert [float(sums.loss), float(sums.nll), float(sums.tokens), float(sums.chunks),
            float(sums.grad_norm)] == pytest.approx([15.0, 12.0, 30.0, 6.0, 1.5])
    # a checkpoint holds them flat, in this order, as older checkpoints did
    assert meter.state_dict()["sums"].tolist() == pytest.approx(
        [15.0, 12.0, 30.0, 6.0, 1.5, 3.6, 2.4, 6.0, 0.0, 1.0, 3.0, 4.0])
    old = Meter(num_experts=2, device=torch.device("cpu"))
    old.load_state_dict({**meter.state_dict(), "sums": meter.state_dict()["sums"][:5 + 2 * 2]})
    assert old.sums.argmax_counts.tolist() == [6.0, 0.0]  # no posterior sums before: zeros
    assert old.sums.posterior_sum.tolist() == [0.0, 0.0] and float(old.sums.scored_chunks) == 0


def test_the_log_line_reads_the_named_sums_reduced_over_ranks(tiny_bin, tmp_path, monkeypatch):
    """log_train all-reduces every one of the interval's sums in one tensor and reads each
    figure by its name: with a second rank's sums added by a stand-in all-reduce, each field of
    the line is the two ranks' together (the gradient norm, the same on every rank, is not)."""
    from moelab.train import trainer as trainer_module
    from moelab.train.meter import TrainSums

    def sums(**values) -> TrainSums:
        return TrainSums(**{k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})

    mine = sums(loss=30.0, nll=20.0, tokens=10, chunks=2, grad_norm=3.0,
                responsibility_sum=[1.5, 0.5], argmax_counts=[2, 0], posterior_sum=[1.0, 1.0],
                scored_chunks=2)
    other = sums(loss=90.0, nll=70.0, tokens=20, chunks=6, grad_norm=3.0,
                 responsibility_sum=[2.5, 3.5], argmax_counts=[1, 5], posterior_sum=[0.0, 3.0],
                 scored_chunks=3)
    reduced = []

    def all_reduce_sum(tensor, dist):
        reduced.append(tensor.shape)
        tensor += other.tensor  # in place, as torch.distributed.all_reduce
        return tensor

    monkeypatch.setattr(trainer_module, "all_reduce_sum", all_reduce_sum)
    config = RunConfig.from_kwargs(str(tiny_bin), max_update=1, method="sMoEup",
                                   num_experts=2, save_dir=str(tmp_path), **TINY)
    trainer = trainer_module.Trainer(config, DistInfo())
    trainer.reshaped = True  # as with a remedy on: the line adds the model's own posterior
    trainer.meter.sums, trainer.meter.updates = mine, 2
    record = trainer.log_train(lr=1e-3)
    assert reduced == [torch.Size([TrainSums.size(2)])]  # one all-reduce, every field
    assert record["loss"] == pytest.approx(120 / 30)
    assert record["nll"] == pytest.approx(90 / 30)
    assert record["grad_norm"] == pytest.approx(1.5)  # this rank's sum over its 2 updates
    assert record["posterior_mass"] == pytest.approx([0.5, 0.5])  # per chunk
    assert record["usage_entropy"] == pytest.approx(-(0.375 * math.log(0.375)
                                                      + 0.625 * math.log(0.625)))
    assert record["model_posterior_mass"] == pytest.approx([1.0 / 5, 4.0 / 5])  # per scored


@pytest.mark.parametrize("other_rank, stop_here", [("bad", False), ("bad", True),
                                                   ("stop", False)])
def test_train_step_hears_every_rank_by_name_in_one_all_reduce(tiny_bin, monkeypatch,
                                                               other_rank, stop_here):
    """Another rank's non-finite loss skips the update here, a stop request on either rank
    stops it, neither implies the other, and the other rank's FLOPs add to this rank's: all
    in the one all-reduce."""
    from moelab.train import update
    from moelab.train.update import UpdateChecks

    model, batch = _clip_setup(tiny_bin)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def step(stop_requested=False):
        return train_step(EMStep(model, Method.parse("hMoEup")), [batch], optimizer,
                          dist=DistInfo(), clip_norm=0.0, stop_requested=stop_requested,
                          autocast=autocast_context(torch.device("cpu")))

    alone = step()
    other = UpdateChecks.zeros(device=torch.device("cpu"))
    getattr(other, other_rank).fill_(1.0)
    other.mstep_flops.fill_(1e9)
    calls = []

    def all_reduce_sum(tensor, dist):
        calls.append(tensor.shape)
        tensor += other.tensor
        return tensor

    monkeypatch.setattr(update, "all_reduce_sum", all_reduce_sum)
    stats = step(stop_requested=stop_here)
    assert calls == [torch.Size([UpdateChecks.size()])]
    assert (stats.skipped, stats.stop) == (other_rank == "bad",
                                           stop_here or other_rank == "stop")
    assert stats.flops.mstep == alone.flops.mstep + 1e9
    assert (stats.flops.estep, stats.flops.gating, stats.flops.output) == (
        alone.flops.estep, alone.flops.gating, alone.flops.output)


def test_validation_and_training_use_the_same_objective(tiny_bin):
    """validate's loss and nll are em_step's on the same batches with dropout off, for hard and
    soft EM with a learned prior: the winner's -log p(x, z* | c) and its -log p(x | z*), or the
    marginal -log p(x | c), prior included in both."""
    from moelab.train.objectives import em_step
    from moelab.train.scoring import ExpertScorer
    from moelab.train.trainer import valid_batches
    from moelab.train.validation import validate

    ds = BinarizedDataset(tiny_bin, "valid")
    for name in ("hMoElp", "sMoElp"):
        config = RunConfig.from_kwargs(str(tiny_bin), max_update=1, method=name, num_experts=3,
                                       **TINY)
        torch.manual_seed(0)
        model = MixtureLM(model_config(config.model, vocab_size=ds.vocab_size,
                                       pad_id=ds.pad_id, tokens_per_sample=64)).eval()
        method, batches = Method.parse(name), valid_batches(ds, config)
        result = validate(model, batches, DistInfo(), method)
        loss = nll = 0.0
        for position in range(batches.batches_per_epoch):
            out = em_step(ExpertScorer(model), batches.batch(1, position), method)
            loss, nll = loss + out.loss.item(), nll + out.nll.item()
        assert result.loss == pytest.approx(loss / result.num_tokens, rel=1e-5), name
        assert result.nll == pytest.approx(nll / result.num_tokens, rel=1e-5), name
        if method.hard:  # the prior is in the loss, not in the nll
            assert result.loss != pytest.approx(result.nll, rel=1e-3)


@pytest.mark.usefixtures("one_thread")
def test_train_log_grad_norm_is_the_mean_of_its_updates_norms(tiny_bin, tmp_path, monkeypatch):
    from moelab.train import trainer

    norms: list[float] = []
    real_step = trainer.train_step

    def recording_step(*args, **kwargs):
        stats = real_step(*args, **kwargs)
        norms.append(float(stats.grad_norm))
        return stats

    monkeypatch.setattr(trainer, "train_step", recording_step)
    train(tiny_bin, max_update=4, log_interval=2, save_dir=tmp_path, **FAST)
    assert len(norms) == 4 and min(norms) > 0
    logged = list(read_history(tmp_path).query("kind == 'train'")["grad_norm"])
    assert logged == pytest.approx([(norms[0] + norms[1]) / 2, (norms[2] + norms[3]) / 2],
                                   rel=1e-6)
