"""Reliability under faults: killed anywhere, damaged or hostile files, failed writes, NaN.

The kill test runs `python -m moelab train` in subprocesses and makes each one SIGKILL itself at
a chosen point (the MOELAB_FAULT testing hook, moelab/train/faults.py), restarts it, and checks
that the finished run is bit-identical to one never interrupted. Everything else runs in-process
on the tiny data-bin.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.cli import main
from moelab.data import BinarizedDataset
from moelab.errors import MoelabError
from moelab.train import CheckpointError, load_checkpoint, train
from moelab.train import trainer as trainer_module
from moelab.train import update as update_module
from moelab.train.checkpoint import previous_path, read_checkpoint, save_checkpoint
from moelab.train.faults import parse

TINY = dict(arch="tiny", decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
            decoder_attention_heads=4, tokens_per_sample=64, max_tokens=512, device="cpu",
            progress_bar=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoints_all_readable(save_dir: Path) -> list[str]:
    names = sorted(p.name for p in save_dir.glob("*.pt"))
    for name in names:
        read_checkpoint(save_dir / name)  # raises if any is damaged
    return names


def _log(save_dir: Path) -> list[dict]:
    """The log lines minus what depends on the clock."""
    lines = [json.loads(x) for x in (save_dir / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall", "tokens_per_s", "train_seconds")}
            for r in lines]


def _same_weights(a: dict, b: dict) -> None:
    assert a["num_updates"] == b["num_updates"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["data_position"] == b["data_position"]


# --------------------------------------------------------------------------- the hook


def test_fault_plan_parsing_and_the_hook_is_off_by_default():
    assert parse("step:7, save:2") == {"step": 7, "save": 2}
    assert parse("") == {}
    for bad in ("step", "step:0", "boom:1", "save:x"):
        with pytest.raises(ValueError, match="MOELAB_FAULT"):
            parse(bad)
    from moelab.train import faults

    assert "MOELAB_FAULT" not in os.environ and faults.hit is faults._no_fault


# --------------------------------------------------------------------------- killed anywhere

KILL_RUN = ["--method", "sMoElp", "--num-experts", "2", "--dropout", "0.1", "--max-update", "12",
            "--validate-interval-updates", "4", "--save-interval-updates", "2",
            "--log-interval", "3", "--warmup-updates", "3", "--lr", "0.003", "--seed", "5",
            "--arch", "tiny", "--decoder-layers", "2", "--decoder-embed-dim", "64",
            "--decoder-ffn-embed-dim", "128", "--decoder-attention-heads", "4",
            "--tokens-per-sample", "64", "--max-tokens", "512", "--device", "cpu",
            "--no-progress-bar"]


def _launch(tiny_bin, save_dir, fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MOELAB_FAULT", None)
    if fault:
        env["MOELAB_FAULT"] = fault
    argv = [sys.executable, "-m", "moelab", "train", str(tiny_bin), "--save-dir", str(save_dir),
            *KILL_RUN]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _run(tiny_bin, save_dir, fault=None) -> tuple[int, str]:
    proc = _launch(tiny_bin, save_dir, fault)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
def test_killed_anywhere_the_run_resumes_exactly(tiny_bin, tmp_path):
    """SIGKILL inside a step, during validation, halfway through writing a checkpoint, between
    a complete new checkpoint and its rename, at a random moment, and with checkpoint_last.pt
    damaged afterwards: the resumed run ends bit-identical to an uninterrupted one, and no
    checkpoint on disk is ever unreadable."""
    reference, chain = tmp_path / "reference", tmp_path / "chain"
    code, err = _run(tiny_bin, reference)
    assert code == 0, err

    killed = []
    for fault in ("step:7", "valid:1", "save:2", "replace:2"):
        code, err = _run(tiny_bin, chain, fault)
        assert code == -signal.SIGKILL, f"{fault} did not fire: {code}\n{err}"
        killed.append(fault)
        assert "checkpoint_last.pt" in _checkpoints_all_readable(chain)
        assert not (chain / "checkpoint_last.pt.tmp").exists()
    # the fault points above leave a half-written temporary file or none: the rerun clears it

    # A damaged checkpoint_last.pt (a disk fault, a copy cut short): fall back to the previous.
    last = chain / "checkpoint_last.pt"
    updates_before = read_checkpoint(last)["num_updates"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    code, err = _run(tiny_bin, chain, "step:3")
    assert code == -signal.SIGKILL
    assert f"checkpoint {last} is truncated or corrupt" in err
    assert f"resuming from the previous checkpoint {previous_path(last)}" in err
    assert read_checkpoint(previous_path(last))["num_updates"] < updates_before
    _checkpoints_all_readable(chain)

    # One kill at a random moment: once the resumed run has logged something new.
    delay = random.uniform(0.0, 1.5)
    proc = _launch(tiny_bin, chain)
    log = chain / "train_log.jsonl"
    size = log.stat().st_size
    deadline = time.monotonic() + 120
    while proc.poll() is None and log.stat().st_size <= size and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    _checkpoints_all_readable(chain)

    code, err = _run(tiny_bin, chain)
    assert code == 0, err
    assert "resumed from" in err
    assert not [p for p in chain.iterdir() if p.name.endswith(".tmp")]
    assert _log(chain) == _log(reference)
    assert [r["update"] for r in _log(chain) if r["kind"] == "train"] == [3, 6, 9, 12]
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        _same_weights(read_checkpoint(chain / name), read_checkpoint(reference / name))
    print(f"kill points: {killed} + damaged checkpoint_last + random kill after {delay:.2f}s")


# --------------------------------------------------------------------------- pre-emption


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_at_the_update_boundary_and_exit_nonzero(tiny_bin, tmp_path,
                                                                          sig):
    """How clusters pre-empt: the signal is honoured after the update in progress, which is
    saved as checkpoint_last; the run exits 128 + signal number, saying how to resume, and the
    resumed run ends where an uninterrupted one does."""
    reference, chain = tmp_path / "reference", tmp_path / "chain"
    code, err = _run(tiny_bin, reference)
    assert code == 0, err
    proc = _launch(tiny_bin, chain)
    log = chain / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and not (log.is_file() and log.stat().st_size) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"{name} received" in err and "run the same command again to resume" in err
    saved = read_checkpoint(chain / "checkpoint_last.pt")
    assert 3 <= saved["num_updates"] < 12  # after the first log line, before the end
    code, err = _run(tiny_bin, chain)
    assert code == 0, err
    assert f"resumed from {chain / 'checkpoint_last.pt'} at update {saved['num_updates']}" in err
    assert _log(chain) == _log(reference)
    _same_weights(read_checkpoint(chain / "checkpoint_last.pt"),
                  read_checkpoint(reference / "checkpoint_last.pt"))


@pytest.mark.parametrize("leftover", ["checkpoint_best.pt", "train_log.jsonl"])
def test_save_dir_of_an_earlier_run_without_checkpoint_last_is_refused(tiny_bin, tmp_path,
                                                                        leftover):
    save_dir = tmp_path / "earlier"
    save_dir.mkdir()
    (save_dir / leftover).write_bytes(b"an earlier run's file")
    with pytest.raises(MoelabError, match=f"holds {leftover} from an earlier run but no "
                                          "checkpoint_last.pt"):
        train(str(tiny_bin), **TINY, max_update=1, save_dir=str(save_dir))
    assert (save_dir / leftover).read_bytes() == b"an earlier run's file"
    assert sorted(p.name for p in save_dir.iterdir()) == [leftover]


def test_tokens_per_s_after_a_resume_counts_the_time_before_the_checkpoint(tiny_bin, tmp_path):
    """The log interval in progress at a checkpoint keeps its tokens and its seconds: the first
    line after a resume is not its tokens over the few seconds since the restart."""
    options = dict(TINY, save_dir=str(tmp_path / "run"), log_interval=8, warmup_updates=2)
    train(str(tiny_bin), **options, max_update=6)  # saved mid-interval: 6 of 8 updates
    meter = read_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["meter"][0]
    assert meter["updates"] == 6 and meter["elapsed"] > 0
    per_update = meter["elapsed"] / 6
    train(str(tiny_bin), **options, max_update=8)
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    line = [r for r in map(json.loads, lines) if r["kind"] == "train"][-1]
    assert line["update"] == 8
    honest = meter["global_tokens"] * 8 / 6 / (meter["elapsed"] + 2 * per_update)
    # timing noise on a shared machine aside, it is the 8 updates' tokens over their time;
    # counting only the 2 updates since the resume would make it about 4 times that
    assert line["tokens_per_s"] < 2 * honest, (line["tokens_per_s"], honest)


# --------------------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def trained_dir(tiny_bin, tmp_path_factory):
    """A save dir after 4 updates with a save every 2: checkpoint_last (4) and .prev (2)."""
    save_dir = tmp_path_factory.mktemp("faults-trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # restored after: a module fixture must not change later tests
    try:
        train(tiny_bin, method="hMoEup", num_experts=2, max_update=4, save_interval_updates=2,
              log_interval=1, save_dir=save_dir, **TINY)
    finally:
        torch.set_num_threads(threads)
    return save_dir


def _copy(trained_dir, tmp_path) -> Path:
    shutil.copytree(trained_dir, tmp_path / "run")
    return tmp_path / "run"


RESUME = dict(TINY, method="hMoEup", num_experts=2, log_interval=1, save_interval_updates=2)


def test_previous_checkpoint_is_kept_beside_the_last(trained_dir):
    last = read_checkpoint(trained_dir / "checkpoint_last.pt")
    prev = read_checkpoint(trained_dir / "checkpoint_last.prev.pt")
    assert (last["num_updates"], prev["num_updates"]) == (4, 2)
    assert not [p for p in trained_dir.iterdir() if p.name.endswith(".tmp")]


def test_damaged_last_checkpoint_falls_back_to_the_previous(tiny_bin, trained_dir, tmp_path,
                                                            capsys):
    save_dir = _copy(trained_dir, tmp_path)
    last = save_dir / "checkpoint_last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged block, same size
    last.write_bytes(bytes(data))
    result = train(tiny_bin, max_update=5, save_dir=save_dir, **RESUME)
    err = capsys.readouterr().err
    assert f"checkpoint {last} is truncated or corrupt" in err
    assert "resuming from the previous checkpoint" in err and "at update 2" in err
    assert result.num_updates == 5
    assert [r["update"] for r in _log(save_dir) if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    # with no previous checkpoint either, the error names the file and what to do
    previous_path(last).unlink()
    last.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"checkpoint {last} is truncated or corrupt.*"
                                              "delete it to start over"):
        train(tiny_bin, max_update=6, save_dir=save_dir, **RESUME)


def test_missing_last_with_previous_resumes_from_the_previous(tiny_bin, trained_dir, tmp_path,
                                                              capsys):
    """A filesystem without hard links moves checkpoint_last to .prev before the new one lands."""
    save_dir = _copy(trained_dir, tmp_path)
    (save_dir / "checkpoint_last.pt").unlink()
    result = train(tiny_bin, max_update=3, save_dir=save_dir, **RESUME)
    assert "checkpoint_last.prev.pt (the checkpoint before it) is there" in capsys.readouterr().err
    assert result.num_updates == 3


class _Payload:
    """Unpickling this runs `Path(marker).touch()`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_crafted_to_run_code_is_refused_and_never_run(tiny_bin, trained_dir, tmp_path,
                                                                 capsys):
    save_dir = _copy(trained_dir, tmp_path)
    marker = tmp_path / "pwned"
    hostile = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)
    hostile["extra"] = _Payload(marker)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        with open(save_dir / name, "wb") as f:
            torch.save(hostile, f)
    previous_path(save_dir / "checkpoint_last.pt").unlink()
    # the payload is live: an unsafe load would run it
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(pickle.dumps(_Payload(tmp_path / "probe-marker")))
    pickle.loads(probe.read_bytes())
    assert (tmp_path / "probe-marker").exists()

    path = save_dir / "checkpoint_best.pt"
    with pytest.raises(CheckpointError, match="never unpickles") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="did not run anything"):
        train(tiny_bin, max_update=6, save_dir=save_dir, **RESUME)
    assert main(["train", str(tiny_bin), "--max-update", "6", "--save-dir", str(save_dir),
                 "--arch", "tiny", "--device", "cpu", "--no-progress-bar"]) == 2
    assert main(["eval-lm", str(tiny_bin), "--path", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count(f"checkpoint {save_dir}") >= 2
    assert not marker.exists()


def test_altered_checkpoint_is_a_clear_error(tiny_bin, trained_dir, tmp_path):
    save_dir = _copy(trained_dir, tmp_path)
    path = save_dir / "checkpoint_best.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model"]["transformer.ln_f.weight"]
    save_checkpoint(path, checkpoint)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is damaged: its model config"):
        load_checkpoint(path)
    checkpoint = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)
    del checkpoint["rng"]
    save_checkpoint(save_dir / "checkpoint_last.pt", checkpoint)
    (save_dir / "checkpoint_last.prev.pt").unlink()
    with pytest.raises(CheckpointError, match="cannot be resumed from: it lacks rng"):
        train(tiny_bin, max_update=6, save_dir=save_dir, **RESUME)


def _bin_copy(tiny_bin, tmp_path) -> Path:
    copy = tmp_path / "bin"
    shutil.copytree(tiny_bin, copy)
    return copy


@pytest.mark.parametrize("damage, message", [
    (lambda b: np.save(b / "valid.domains.npy", np.load(b / "valid.domains.npy")[:-3]),
     "valid.domains.npy has 3 fewer"),
    (lambda b: np.save(b / "valid.offsets.npy", np.load(b / "valid.offsets.npy")[:-2]),
     "valid.offsets.npy"),
    (lambda b: np.save(b / "valid.domains.npy", np.array([{"x": 1}] * 3, dtype=object),
                       allow_pickle=True), "valid.domains.npy is missing or damaged"),
    (lambda b: (b / "valid.offsets.npy").write_bytes((b / "valid.offsets.npy").read_bytes()[:90]),
     "valid.offsets.npy is missing or damaged"),
    (lambda b: (b / "meta.json").write_text('{"splits": {}}'), "meta.json lacks"),
    (lambda b: (b / "meta.json").write_text(
        (b / "meta.json").read_text().replace('"uint16"', '"object"')), "dtype"),
    (lambda b: (b / "meta.json").write_text("[1, 2]"), "meta.json is damaged"),
])
def test_damaged_data_bin_is_a_clear_error(tiny_bin, tmp_path, damage, message):
    copy = _bin_copy(tiny_bin, tmp_path)
    damage(copy)
    with pytest.raises(MoelabError, match=message) as e:
        BinarizedDataset(copy, "valid")
    assert str(copy) in str(e.value) and "moelab preprocess" in str(e.value)


def test_missing_or_damaged_tokenizer_model_is_a_clear_error(tiny_bin, tmp_path, capsys):
    copy = _bin_copy(tiny_bin, tmp_path)
    model = copy / "spm.model"
    model.write_bytes(b"\x00not a sentencepiece model" * 10)
    with pytest.raises(MoelabError, match=f"{model} is not a readable SentencePiece model"):
        BinarizedDataset(copy, "valid").tokenizer()
    model.unlink()
    with pytest.raises(MoelabError, match=f"tokenizer model {model} is missing; run `moelab "
                                          "preprocess` again"):
        BinarizedDataset(copy, "valid").tokenizer()


# --------------------------------------------------------------------------- failed writes


def _fail_on_call(n: int, error: OSError):
    """A torch.save that fails on its n-th call (1-based) after writing part of the file."""
    real = torch.save
    calls = []

    def fake(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            f.write(b"PK\x03\x04 part of a checkpoint")
            raise error
        return real(obj, f, *args, **kwargs)

    return fake


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "ENOSPC: No space left on device"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "EACCES: Permission denied"),
])
def test_failed_checkpoint_write_stops_with_a_message_and_keeps_the_last(
        tiny_bin, tmp_path, monkeypatch, capsys, error, words):
    save_dir = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _fail_on_call(3, error))  # saves at updates 1, 2, 3
    argv = ["train", str(tiny_bin), "--save-dir", str(save_dir), "--max-update", "4",
            "--save-interval-updates", "1", "--log-interval", "1", "--method", "hMoEup",
            "--num-experts", "2", "--arch", "tiny", "--decoder-embed-dim", "64",
            "--tokens-per-sample", "64", "--max-tokens", "512", "--device", "cpu",
            "--no-progress-bar"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"could not write checkpoint {save_dir / 'checkpoint_last.pt'}: {words}" in err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert read_checkpoint(save_dir / "checkpoint_last.pt")["num_updates"] == 2
    assert read_checkpoint(save_dir / "checkpoint_last.prev.pt")["num_updates"] == 1
    assert not [p for p in save_dir.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().err


def test_a_real_write_error_from_the_os_is_reported(tmp_path):
    """The OS refuses the write (file-size limit, EFBIG): torch says "unexpected pos"; we don't."""
    resource = pytest.importorskip("resource")
    target = tmp_path / "checkpoint_last.pt"
    save_checkpoint(target, {"format": "moelab-checkpoint", "value": torch.ones(4)})
    before = target.read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(CheckpointError, match=f"{target}: EFBIG: File too large"):
            save_checkpoint(target, {"format": "moelab-checkpoint", "value": torch.ones(100_000)},
                            keep_previous=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]


def test_unwritable_save_dir_and_log_are_clear_errors(tiny_bin, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(MoelabError, match=f"cannot write to --save-dir {blocker}"):
        train(tiny_bin, max_update=1, save_dir=blocker / "sub", **TINY)

    def full(save_dir, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trainer_module, "append_record", full)
    with pytest.raises(MoelabError, match="could not write the training log .*No space left"):
        train(tiny_bin, max_update=2, log_interval=1, save_dir=tmp_path / "run", **TINY)


def test_out_of_memory_is_a_message(tiny_bin, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_module, "train_step", oom)
    with pytest.raises(MoelabError, match="out of memory at update 1 .* lower --max-tokens"):
        train(tiny_bin, max_update=2, save_dir=tmp_path, **TINY)


# --------------------------------------------------------------------------- numerical faults


def _poison(monkeypatch, bad):
    """em_step whose loss is NaN for the batches `bad(batch)` picks (by content, so a resumed
    run poisons the same ones)."""
    real = update_module.em_step

    def em_step(scorer, batch, method, **kwargs):
        out = real(scorer, batch, method, **kwargs)
        if bad(batch):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(update_module, "em_step", em_step)


class _OneGoodUpdate:
    """A tiny model after one good update, its weights and Adam state copied, and the next
    batch: what a skipped update must leave exactly as it is."""

    def __init__(self, tiny_bin):
        from moelab.data import TrainBatches
        from moelab.model import MixtureLM
        from moelab.train import RunConfig
        from moelab.train.config import model_config
        from moelab.train.distributed import DistInfo
        from moelab.train.method import Method
        from moelab.train.update import EMStep, autocast_context, build_optimizer, train_step

        ds = BinarizedDataset(tiny_bin, "train")
        config = RunConfig.from_kwargs(str(tiny_bin), max_update=1, num_experts=2, **TINY)
        self.model = MixtureLM(model_config(config.model, vocab_size=ds.vocab_size,
                                            pad_id=ds.pad_id, tokens_per_sample=64))
        self.optimizer = build_optimizer(self.model, config, torch.device("cpu"))
        batches = list(TrainBatches(ds, tokens_per_sample=64, max_tokens=512).epoch(1))[:2]
        self.next_batch = batches[1]
        step = EMStep(self.model, Method.parse("hMoEup"))
        kw = dict(dist=DistInfo(), clip_norm=0.0, autocast=autocast_context(torch.device("cpu")))
        self.step = lambda batch: train_step(step, [batch], self.optimizer, **kw)
        assert not self.step(batches[0]).skipped
        self.weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.adam = {k: {n: t.clone() for n, t in s.items()}
                     for k, s in self.optimizer.state.items()}

    def assert_untouched(self) -> None:
        assert all(p.grad is None for p in self.model.parameters())  # gradients dropped
        for k, v in self.model.state_dict().items():
            assert torch.equal(v, self.weights[k]), k
        for k, s in self.optimizer.state.items():
            assert all(torch.equal(t, self.adam[k][n]) for n, t in s.items())  # no Adam step


def test_a_nan_update_is_skipped_without_touching_weights_or_adam(tiny_bin):
    run = _OneGoodUpdate(tiny_bin)
    with torch.no_grad():
        run.model.transformer.ln_f.weight[0] = float("inf")  # forward gives NaN logits
    run.weights["transformer.ln_f.weight"][0] = float("inf")
    stats = run.step(run.next_batch)
    assert stats.skipped and not torch.isfinite(stats.loss)
    run.assert_untouched()


def test_nan_updates_are_skipped_logged_and_resume_exactly(tiny_bin, tmp_path, monkeypatch):
    _poison(monkeypatch, lambda batch: int(batch.doc_ids.sum()) % 4 == 1)
    options = dict(TINY, method="sMoEup", num_experts=2, log_interval=1, warmup_updates=2,
                   lr=3e-3, seed=2)
    full = train(tiny_bin, max_update=8, save_dir=tmp_path / "full", **options)
    train(tiny_bin, max_update=4, save_dir=tmp_path / "split", **options)
    resumed = train(tiny_bin, max_update=8, save_dir=tmp_path / "split", **options)

    log = _log(tmp_path / "full")
    skipped = [r["skipped_updates"] for r in log if r["kind"] == "train"]
    assert [r["update"] for r in log if r["kind"] == "train"] == list(range(1, 9))
    assert skipped[-1] > 0 and skipped == sorted(skipped), skipped
    assert all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["kind"] == "valid" and log[-1]["skipped_updates"] == skipped[-1]
    assert all(torch.isfinite(p).all() for p in full.model.parameters())
    split = _log(tmp_path / "split")
    assert [r for r in split if r["kind"] == "train"] == [r for r in log if r["kind"] == "train"]
    assert split[-1] == log[-1]  # the final validation
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_too_many_bad_updates_in_a_row_stop_the_run_naming_the_update(tiny_bin, tmp_path,
                                                                      monkeypatch, capsys):
    calls = {"n": 0}

    def after_three(batch):  # updates 1-3 are fine, then every batch's loss is NaN
        calls["n"] += 1
        return calls["n"] > 3

    _poison(monkeypatch, after_three)
    argv = ["train", str(tiny_bin), "--save-dir", str(tmp_path), "--max-update", "20",
            "--save-interval-updates", "2", "--max-bad-updates", "4", "--log-interval", "1",
            "--arch", "tiny", "--decoder-embed-dim", "64", "--tokens-per-sample", "64",
            "--max-tokens", "512", "--device", "cpu", "--no-progress-bar"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "update 4 skipped, not finite (loss nan" in err and "(3 in a row, 3 in all)" in err
    assert "stopped at update 4: its loss or gradient was not finite" in err
    assert "on 4 batches in a row (--max-bad-updates 4)" in err and "Traceback" not in err
    checkpoint = read_checkpoint(tmp_path / "checkpoint_last.pt")
    assert checkpoint["num_updates"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_non_finite_weights_are_never_saved(tiny_bin, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step  # fairseq's adam is the AdamW update

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0][0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(MoelabError, match="weights at update 1 are not finite"):
        train(tiny_bin, max_update=3, save_interval_updates=1, save_dir=tmp_path, **TINY)
    assert not (tmp_path / "checkpoint_last.pt").exists()


def test_an_infinite_gradient_with_a_finite_loss_is_skipped(tiny_bin):
    """The loss alone is not the check: a gradient that overflows while the loss is finite
    would still put inf/NaN into the weights and Adam's moments."""
    run = _OneGoodUpdate(tiny_bin)
    hook = run.model.transformer.ln_f.weight.register_hook(
        lambda grad: torch.full_like(grad, float("inf")))
    try:
        stats = run.step(run.next_batch)
    finally:
        hook.remove()
    assert torch.isfinite(stats.loss) and not torch.isfinite(stats.grad_norm)
    assert stats.skipped
    run.assert_untouched()
