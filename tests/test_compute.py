"""What training costs: each update's model FLOPs against torch's FLOP counter, the count in the
log and the checkpoint (continued by a resume), and the budgets that stop a run on it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moelab import cli
from moelab.data import BinarizedDataset, TrainBatches
from moelab.model import MixtureLM, log_probs
from moelab.train import read_history, train
from moelab.train import trainer as trainer_module
from moelab.train.checkpoint import LAST, read_checkpoint
from moelab.train.compute import Flops, batch_flops
from moelab.train.config import RunConfig, model_config
from moelab.train.method import Method
from moelab.train.update import EMStep

T = 32
TINY = dict(arch="tiny", decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
            decoder_attention_heads=2, mean_pool_gating_network_encoder_dim=24,
            tokens_per_sample=T, max_tokens=192, warmup_updates=2, lr=3e-3, device="cpu",
            progress_bar=False, log_interval=1)


def _model(tiny_bin, method: str, K: int = 3, dropout: float = 0.1) -> MixtureLM:
    """The tiny model of `method`: gating width 24 against a width of 32, so the gating
    network's input projection is there to be counted."""
    ds = BinarizedDataset(tiny_bin, "train")
    config = RunConfig.from_kwargs(str(tiny_bin), method=method, max_update=1, dropout=dropout,
                                   num_experts=None if method == "dense" else K, **TINY)
    torch.manual_seed(0)
    return MixtureLM(model_config(config.model, vocab_size=ds.vocab_size, pad_id=ds.pad_id,
                                  tokens_per_sample=T)).train()


def _real_batch(tiny_bin):
    """A real training batch: chunks of several lengths (padding) with their contexts."""
    ds = BinarizedDataset(tiny_bin, "train")
    batches = TrainBatches(ds, tokens_per_sample=T, max_tokens=192, seed=3).epoch(1)
    batch = next(b for b in batches if len(set(b.lengths.tolist())) > 1)
    assert (batch.context_lengths > 0).any()
    return batch


def _counted(step: EMStep, batch, *, experts=None) -> float:
    """torch's FlopCounterMode over the real step, forward and backward. SDPA's math backend:
    the counter has no formula for the CPU flash kernel; the math one's matmuls are the full
    T x T, as the count assumes."""
    step.model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_sum, *_ = step(batch, experts)
        loss_sum.backward()
    return counter.get_total_flops()


CASES = [
    ("dense", {}),
    ("hMoEup", {}),
    ("hMoElp", {}),
    ("sMoEup", {}),
    ("sMoElp", {}),
    ("hMoEup", {"estep_tokens": 5}),  # the E-step on the first 5 targets, attention over 5
    ("sMoElp", {"estep_tokens": 5}),
    ("hMoElp", {"estep_dtype": torch.bfloat16}),  # a low-precision E-step costs the same FLOPs
]


@pytest.mark.parametrize("method, options", CASES)
def test_an_updates_flops_are_what_torchs_counter_counts(tiny_bin, method, options):
    """Exact (float rounding) on a real batch with padding and contexts, for every method: the
    E-step's K forwards over the tokens it scores, the M-step's forward and backward over the
    rows it trains, the gating network and the output projection, nothing else."""
    model = _model(tiny_bin, method)
    step = EMStep(model, Method.parse(method), **options)
    batch = _real_batch(tiny_bin)
    counted = _counted(step, batch)
    flops = step.flops(batch)
    assert flops.total == pytest.approx(counted, rel=1e-9)
    assert flops.estep > 0 if method != "dense" else flops.estep == 0
    assert (flops.gating > 0) == method.endswith("lp")


def test_a_reused_e_step_is_counted_once(tiny_bin):
    """Soft EM without dropout reads its E-step off the M-step's forward: no E-step forwards."""
    model = _model(tiny_bin, "sMoElp", dropout=0.0)
    step = EMStep(model, Method.parse("sMoElp"))
    batch = _real_batch(tiny_bin)
    assert step.scorer.reuses_estep(hard=False)
    flops = step.flops(batch)
    assert flops.estep == 0 and flops.total == pytest.approx(_counted(step, batch), rel=1e-9)


def test_a_warm_start_update_runs_no_e_step(tiny_bin):
    model = _model(tiny_bin, "hMoElp")
    step = EMStep(model, Method.parse("hMoElp"))
    batch = _real_batch(tiny_bin)
    experts = torch.arange(batch.tokens.shape[0]) % model.num_experts
    flops = step.flops(batch, estep=False)
    assert flops.estep == 0
    assert flops.total == pytest.approx(_counted(step, batch, experts=experts), rel=1e-9)


def test_the_counter_also_sees_the_chunked_losss_recomputation(tiny_bin, monkeypatch):
    """Where the M-step's softmax is too large to keep, backward recomputes the logits: one
    more projection per M-step target, which the counter counts (hardware FLOPs) and the model
    FLOPs leave out. The difference is exactly that projection."""
    monkeypatch.setattr(log_probs, "SAVE_ELEMENTS", {"cpu": 0})
    model = _model(tiny_bin, "sMoEup")
    step = EMStep(model, Method.parse("sMoEup"))
    batch = _real_batch(tiny_bin)
    c = model.config
    recomputed = 2 * c.vocab_size * c.n_embd * c.num_experts * batch.num_tokens
    assert _counted(step, batch) - step.flops(batch).total == pytest.approx(recomputed,
                                                                           rel=1e-9)


def test_flops_add_up_by_part():
    a, b = Flops(1, 2, 3, 4), Flops(10, 20, 30, 40)
    assert (a + b) == Flops(11, 22, 33, 44) and (a + b).total == 110
    assert a.as_dict() == {"estep": 1, "mstep": 2, "gating": 3, "output": 4, "total": 10}


def test_soft_em_costs_k_times_the_m_step_of_hard_em(tiny_bin):
    """The cost a comparison at equal compute rests on: soft EM trains K rows per chunk."""
    batch = _real_batch(tiny_bin)
    config = _model(tiny_bin, "hMoEup", K=4).config
    hard = batch_flops(config, batch.lengths, T, method=Method.parse("hMoEup"))
    soft = batch_flops(config, batch.lengths, T, method=Method.parse("sMoEup"))
    assert soft.estep == hard.estep and soft.mstep == pytest.approx(4 * hard.mstep)


# --------------------------------------------------------------------------- runs


def _spy_on_updates(monkeypatch) -> list[float]:
    """Every real update of a run, counted by FlopCounterMode as it runs."""
    counted = []
    real = trainer_module.train_step

    def counting(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            stats = real(*args, **kwargs)
        counted.append(counter.get_total_flops())
        return stats

    monkeypatch.setattr(trainer_module, "train_step", counting)
    return counted


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method, options", [("hMoElp", {"update_freq": 2}),
                                             ("sMoEup", {"init_clusters": "tfidf",
                                                         "init_updates": 2})])
def test_the_log_carries_the_flops_torch_counts_in_every_update(tiny_bin, tmp_path,
                                                                 monkeypatch, method, options):
    """train_flops on every log line is the running sum of what the counter saw in the updates
    (validation is not training: it is not counted), micro-batches and a warm start included."""
    counted = _spy_on_updates(monkeypatch)
    train(str(tiny_bin), method=method, num_experts=3, max_update=4, dropout=0.1,
          save_dir=str(tmp_path / "run"), validate_interval_updates=2, **options, **TINY)
    history = read_history(tmp_path / "run")
    logged = history[history["kind"] == "train"]["train_flops"].to_numpy()
    assert len(counted) == 4
    assert logged == pytest.approx([sum(counted[: i + 1]) for i in range(4)], rel=1e-9)
    valid = history[history["kind"] == "valid"]
    assert valid["train_flops"].tolist() == pytest.approx([sum(counted[:2]), sum(counted)])
    seconds = history["train_seconds"].to_numpy()
    assert (seconds > 0).all() and (seconds[1:] >= seconds[:-1]).all()
    assert seconds[-1] <= history["wall"].max()


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_continues_the_count(tiny_bin, tmp_path):
    """Stopped at update 3 and resumed to 5, the count equals an unbroken run's; the checkpoint
    keeps it."""
    options = dict(method="hMoEup", num_experts=3, dropout=0.0, **TINY)
    train(str(tiny_bin), max_update=5, save_dir=str(tmp_path / "whole"), **options)
    train(str(tiny_bin), max_update=3, save_dir=str(tmp_path / "parts"), **options)
    seconds_before = read_checkpoint(tmp_path / "parts" / LAST)["compute"]["train_seconds"]
    train(str(tiny_bin), max_update=5, save_dir=str(tmp_path / "parts"), **options)
    whole, parts = (read_checkpoint(tmp_path / d / LAST)["compute"] for d in ("whole", "parts"))
    assert parts["train_flops"] == whole["train_flops"] > 0
    assert parts["train_seconds"] > seconds_before > 0
    lines = [json.loads(line) for line in
             (tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()]
    whole_lines = [json.loads(line) for line in
                   (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert ([x["train_flops"] for x in lines if x["kind"] == "train"]
            == [x["train_flops"] for x in whole_lines if x["kind"] == "train"])


@pytest.mark.usefixtures("one_thread")
def test_max_flops_stops_at_the_first_update_that_reaches_it(tiny_bin, tmp_path, capsys):
    """Like --max-update: the run saves, says why it stopped and exits 0."""
    probe = train(str(tiny_bin), method="hMoEup", num_experts=3, max_update=4,
                  save_dir=str(tmp_path / "probe"), **TINY)
    per_update = probe.history[probe.history["kind"] == "train"]["train_flops"].tolist()
    budget = (per_update[1] + per_update[2]) / 2  # passed by update 3, not by update 2
    argv = ["train", str(tiny_bin), "--method", "hMoEup", "--num-experts", "3",
            "--max-flops", repr(budget), "--save-dir", str(tmp_path / "budget"),
            "--no-progress-bar"]
    for key, value in TINY.items():
        if key != "progress_bar":
            argv += ["--" + key.replace("_", "-"), str(value)]
    assert cli.main(argv) == 0
    checkpoint = read_checkpoint(tmp_path / "budget" / LAST)
    assert checkpoint["num_updates"] == 3
    assert checkpoint["compute"]["train_flops"] == pytest.approx(per_update[2], rel=1e-12)
    assert "stopped at update 3: --max-flops" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_stop_time_hours_stops_the_run_and_saves(tiny_bin, tmp_path, capsys, monkeypatch):
    """fairseq's rule on the run's whole time: with a clock on which each update takes 1,000
    s, --stop-time-hours 0.7 (2,520 s) stops after update 3, saved."""
    monkeypatch.setattr(trainer_module.Trainer, "elapsed",
                        lambda self: 1000.0 * self.state.num_updates)
    result = train(str(tiny_bin), method="hMoEup", num_experts=3, stop_time_hours=0.7,
                   save_dir=str(tmp_path / "run"), **TINY)
    assert result.num_updates == 3
    assert read_checkpoint(tmp_path / "run" / LAST)["num_updates"] == 3
    assert "stopped at update 3: the run has taken" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_validate_interval_flops_validates_where_the_count_passes_a_multiple(tiny_bin,
                                                                             tmp_path):
    """Runs of different cost validated at the same compute: after each update whose count
    passed a multiple of the interval (and at the end)."""
    probe = train(str(tiny_bin), method="dense", max_update=6, save_dir=str(tmp_path / "p"),
                  **TINY)
    flops = probe.history[probe.history["kind"] == "train"]["train_flops"].tolist()
    interval = flops[1] * 1.01  # about two updates' worth
    run = train(str(tiny_bin), method="dense", max_update=6, validate_interval_flops=interval,
                save_dir=str(tmp_path / "v"), **TINY)
    valid = run.history[run.history["kind"] == "valid"]
    expected = [i + 1 for i in range(6)
                if math.floor(flops[i] / interval) > math.floor((flops[i - 1] if i else 0)
                                                                / interval)]
    assert 2 <= len(expected) < 5 and expected[0] in (2, 3)
    assert valid["update"].tolist() == [*[u for u in expected if u < 6], 6]


def test_budgets_refuse_bad_values(tiny_bin):
    for bad in (dict(max_flops=-1.0), dict(stop_time_hours=math.inf),
                dict(validate_interval_flops=math.nan)):
        with pytest.raises(ValueError, match="--"):
            RunConfig.from_kwargs(str(tiny_bin), max_update=1, **bad)
    # a budget alone is an end
    assert RunConfig.from_kwargs(str(tiny_bin), max_flops=1e12).train.max_flops == 1e12


@pytest.mark.usefixtures("one_thread")
def test_train_seconds_leave_validation_out(tiny_bin, tmp_path, monkeypatch):
    """Validation that takes 0.5 s each time (three times) adds to the run's wall time, not to
    its training time."""
    import time

    real = trainer_module.validate

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "validate", slow)
    result = train(str(tiny_bin), method="dense", max_update=3, validate_interval_updates=1,
                   save_dir=str(tmp_path / "run"), **TINY)
    last = result.history.iloc[-1]
    assert last["kind"] == "valid" and last["update"] == 3
    assert last["wall"] - last["train_seconds"] >= 1.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["hMoElp", "sMoEup"])
def test_the_count_holds_on_cuda_under_the_bf16_m_step(tiny_bin, method):
    """On CUDA the M-step runs under bf16 autocast, where the E-step is never read off it: the
    count of the step as `moelab train` runs it there is still what the counter sees."""
    from moelab.train.update import autocast_context

    model = _model(tiny_bin, method, dropout=0.0).cuda()
    step = EMStep(model, Method.parse(method))
    batch = _real_batch(tiny_bin)
    with autocast_context(torch.device("cuda"), "bfloat16")():
        flops = step.flops(batch)
        counted = _counted(step, batch.to(torch.device("cuda")))
    assert flops.total == pytest.approx(counted, rel=1e-9)
