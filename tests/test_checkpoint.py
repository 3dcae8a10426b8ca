"""Checkpoints: exact resume, atomic writes, refusing a mismatched or damaged checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

from moelab.cli import main
from moelab.train import CheckpointError, load_checkpoint, read_history, train
from moelab.train import checkpoint as ckpt_module
from moelab.train.checkpoint import read_checkpoint, save_checkpoint

TINY = dict(arch="tiny", decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
            decoder_attention_heads=4, tokens_per_sample=64, device="cpu", progress_bar=False)


def _train_losses(save_dir):
    history = read_history(save_dir)
    rows = history[history.kind == "train"]
    return list(zip(rows["update"], rows.loss, rows.nll, rows.lr, rows.grad_norm, strict=True))


def test_resume_continues_exactly(tiny_bin, tmp_path):
    """N updates in one go == N/2, stop, restart with the same --save-dir, run to N.

    Dropout is on, so the RNG state must be restored; update_freq 2 with big batches makes an
    epoch 6 updates long (12 batches), so the run also crosses an epoch after the restart.
    """
    options = dict(TINY, method="hMoElp", num_experts=2, dropout=0.1, max_tokens=4096,
                   update_freq=2, warmup_updates=4, lr=2e-3, log_interval=1, seed=3)
    full = train(tiny_bin, max_update=10, save_dir=tmp_path / "full", **options)
    train(tiny_bin, max_update=5, save_dir=tmp_path / "split", **options)
    resumed = train(tiny_bin, max_update=10, save_dir=tmp_path / "split", **options)

    assert _train_losses(tmp_path / "full") == _train_losses(tmp_path / "split")
    assert len(_train_losses(tmp_path / "full")) == 10
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                              strict=True):
        assert torch.equal(a, b), name
    last = [read_checkpoint(tmp_path / d / "checkpoint_last.pt") for d in ("full", "split")]
    assert last[0]["data_position"] == last[1]["data_position"]
    assert last[0]["data_position"]["epoch"] == 2  # crossed into the second epoch
    states = [c["optimizer"]["state"].values() for c in last]
    for a, b in zip(*states, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.valid.loss == resumed.valid.loss


def test_checkpoint_is_a_plain_weights_only_dict(tiny_bin, tmp_path):
    result = train(tiny_bin, method="hMoEup", num_experts=2, max_update=2, max_tokens=512,
                   save_dir=tmp_path, **TINY)
    checkpoint = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "rng", "data_position", "num_updates",
                "best_valid_loss", "config", "model_config", "tokenizer"):
        assert key in checkpoint, key
    assert checkpoint["num_updates"] == 2 and checkpoint["scheduler"]["num_updates"] == 2
    assert checkpoint["model_config"]["num_experts"] == 2
    assert checkpoint["tokenizer"]["vocab_size"] == result.model_config.vocab_size
    assert len(checkpoint["tokenizer"]["sha256"]) == 64
    assert checkpoint["config"]["optim"]["adam_betas"] == (0.9, 0.98)

    model, model_config, config = load_checkpoint(tmp_path / "checkpoint_best.pt")
    assert not model.training and model_config == result.model_config
    assert config == result.config
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_last.pt"
    save_checkpoint(target, {"format": "moelab-checkpoint", "value": torch.ones(3)})
    before = target.read_bytes()

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {target}: No space"):
        save_checkpoint(target, {"format": "moelab-checkpoint", "value": torch.zeros(3)})
    assert target.read_bytes() == before  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]  # no temp file
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "checkpoint_best.pt", {"x": torch.zeros(1)})
    assert not (tmp_path / "checkpoint_best.pt").exists()


@pytest.fixture(scope="module")
def trained_dir(tiny_bin, tmp_path_factory):
    """A save dir holding a K=2, 2-layer checkpoint."""
    save_dir = tmp_path_factory.mktemp("trained")
    train(tiny_bin, method="hMoEup", num_experts=2, max_update=1, max_tokens=512,
          save_dir=save_dir, **TINY)
    return save_dir


def _copy(trained_dir, tmp_path):
    shutil.copytree(trained_dir, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("change, message", [
    (dict(num_experts=3), "--num-experts = 2 but this run has 3"),
    (dict(decoder_layers=3), "--decoder-layers = 2 but this run has 3"),
    (dict(decoder_embed_dim=32), "--decoder-embed-dim = 64 but this run has 32"),
    (dict(tokens_per_sample=32), "--tokens-per-sample = 64 but this run has 32"),
    (dict(method="hMoElp"), "learned prior (--method *lp) = False but this run has True"),
    (dict(method="sMoEup"), "trained with --method hMoEup but this run is sMoEup"),  # same shapes
])
def test_resume_refuses_another_model(tiny_bin, trained_dir, tmp_path, change, message):
    save_dir = _copy(trained_dir, tmp_path)
    options = {**TINY, "method": "hMoEup", "num_experts": 2, "max_tokens": 512, **change}
    with pytest.raises(CheckpointError) as e:
        train(tiny_bin, max_update=2, save_dir=save_dir, **options)
    assert message in str(e.value) and "use another --save-dir" in str(e.value)
    assert str(save_dir / "checkpoint_last.pt") in str(e.value)


def test_a_resume_that_changes_a_remedy_says_so_and_from_which_update(tiny_bin, trained_dir,
                                                                       tmp_path, capsys):
    """Rescuing a collapsed run with a remedy is allowed, never silent."""
    save_dir = _copy(trained_dir, tmp_path)
    options = {**TINY, "method": "hMoEup", "num_experts": 2, "max_tokens": 512}
    train(tiny_bin, max_update=3, save_dir=save_dir, **options, balance="sinkhorn")
    out = capsys.readouterr()
    said = out.out + out.err
    assert ("checkpoint_last.pt was trained with other remedies; from update 2 on this run "
            "trains with --balance none -> sinkhorn") in said
    train(tiny_bin, max_update=4, save_dir=save_dir, **options, balance="sinkhorn")
    out = capsys.readouterr()
    assert "other remedies" not in out.out + out.err  # the same options: nothing to say


def test_resume_refuses_another_vocabulary(tiny_bin, trained_dir, tmp_path):
    save_dir = _copy(trained_dir, tmp_path)
    path = save_dir / "checkpoint_last.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["tokenizer"]["sha256"] = "0" * 64
    save_checkpoint(path, checkpoint)
    options = {**TINY, "method": "hMoEup", "num_experts": 2, "max_tokens": 512}
    with pytest.raises(CheckpointError, match="tokenizer sha256 000000000000.* use another"):
        train(tiny_bin, max_update=2, save_dir=save_dir, **options)
    checkpoint["model_config"]["vocab_size"] = 999
    save_checkpoint(path, checkpoint)
    with pytest.raises(CheckpointError,
                       match=r"vocabulary size = 999 but this run has \d+; use another"):
        train(tiny_bin, max_update=2, save_dir=save_dir, **options)


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(tiny_bin, trained_dir, tmp_path,
                                                                capsys):
    save_dir = _copy(trained_dir, tmp_path)
    path = save_dir / "checkpoint_last.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    argv = ["train", str(tiny_bin), "--max-update", "2", "--save-dir", str(save_dir),
            "--arch", "tiny", "--num-experts", "2", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} is truncated or corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize("error", [PermissionError("denied"), MemoryError()])
def test_a_checkpoint_that_cannot_be_loaded_now_is_not_called_damaged(
        tiny_bin, trained_dir, tmp_path, monkeypatch, error):
    """A permission or memory failure must not set a good checkpoint aside as damaged."""
    save_dir = _copy(trained_dir, tmp_path)
    path = save_dir / "checkpoint_last.pt"
    shutil.copy(path, ckpt_module.previous_path(path))  # a fallback that would be taken

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(ckpt_module.torch, "load", fail)
    with pytest.raises(CheckpointError, match="not a sign of damage") as e:
        train(tiny_bin, method="hMoEup", num_experts=2, max_update=2, max_tokens=512,
              save_dir=save_dir, **TINY)
    assert not isinstance(e.value, ckpt_module.UnreadableCheckpoint)
    assert path.is_file() and not path.with_name(path.name + ".damaged").exists()


def test_missing_restore_file_is_an_error(tiny_bin, tmp_path):
    with pytest.raises(CheckpointError, match="--restore-file nope.pt not found"):
        train(tiny_bin, max_update=1, save_dir=tmp_path, restore_file="nope.pt", **TINY)


def test_restore_file_from_another_dir(tiny_bin, trained_dir, tmp_path):
    result = train(tiny_bin, method="hMoEup", num_experts=2, max_update=2, max_tokens=512,
                   save_dir=tmp_path, restore_file=str(trained_dir / "checkpoint_last.pt"),
                   **TINY)
    assert result.num_updates == 2
    assert list(read_history(tmp_path).query("kind == 'train'")["update"]) == []  # log_interval 100
    assert read_checkpoint(tmp_path / "checkpoint_last.pt")["num_updates"] == 2


@pytest.mark.parametrize("name", ["checkpoint_last.pt", "checkpoint_7.pt"])
def test_a_relative_restore_file_is_found_in_save_dir_before_the_cwd(tmp_path, monkeypatch,
                                                                    name):
    """fairseq's rule: a relative --restore-file means the one in --save-dir, even when the
    working directory holds a file of that name (another run's, say)."""
    from moelab.train import RunConfig
    from moelab.train.save_dir import find_restore_file

    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / name).write_bytes(b"the save dir's")
    (tmp_path / name).write_bytes(b"the cwd's")
    monkeypatch.chdir(tmp_path)
    config = RunConfig.from_kwargs("bin", max_update=1, save_dir=str(save_dir),
                                   restore_file=name)
    found = find_restore_file(config)
    assert found is not None and found.read_bytes() == b"the save dir's"


def test_resuming_without_a_gating_network_ignores_its_width(tiny_bin, trained_dir, tmp_path):
    """A uniform prior builds no gating network, so --mean-pool-gating-network-encoder-dim
    changes no weight: a resume that sets another one is the same model and goes on."""
    save_dir = _copy(trained_dir, tmp_path)
    saved = read_checkpoint(save_dir / "checkpoint_last.pt")["model_config"]
    assert saved["gating"] is False and saved["gating_dim"] != 24
    result = train(tiny_bin, method="hMoEup", num_experts=2, max_update=2, max_tokens=512,
                   mean_pool_gating_network_encoder_dim=24, save_dir=save_dir, **TINY)
    assert result.num_updates == 2  # resumed from update 1, not refused


def test_checkpoint_wall_time_is_the_training_time_summed_over_resumes(tiny_bin, trained_dir,
                                                                       tmp_path):
    save_dir = _copy(trained_dir, tmp_path)
    first = read_checkpoint(save_dir / "checkpoint_last.pt")["wall_time"]
    assert first > 0
    train(tiny_bin, method="hMoEup", num_experts=2, max_update=2, max_tokens=512,
          save_dir=save_dir, **TINY)
    resumed = read_checkpoint(save_dir / "checkpoint_last.pt")
    assert resumed["num_updates"] == 2 and resumed["wall_time"] > first
