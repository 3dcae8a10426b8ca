"""A Run is a save folder: loaded from a folder or a file, checked against its data-bin, its
evaluations cached on disk, and a checkpoint written before moelab.train.run existed still
loads, scores the same and resumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from moelab.errors import MoelabError
from moelab.eval import evaluate_run
from moelab.eval.cache import scores_path
from moelab.eval.routing import parse_routing
from moelab.model import MixtureLM
from moelab.train import Run, RunConfig, train
from moelab.train.checkpoint import BEST, LAST, read_checkpoint
from moelab.train.config import model_config
from moelab.train.meter import Meter
from moelab.train.state import ProcessRNG, TrainState, build_checkpoint, restore_training
from moelab.train.update import build_optimizer

OLD_RUN = Path(__file__).parent / "fixtures" / "run_v1"


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the fixture (a Run writes its evaluation cache beside the checkpoint)."""
    shutil.copytree(OLD_RUN, tmp_path / "run_v1")
    return tmp_path / "run_v1"


def test_a_checkpoint_from_before_the_run_module_loads_and_scores_the_same(old_run):
    run = Run.load(old_run / "run" / LAST, data_bin=old_run / "data-bin")
    assert run.method == "hMoElp" and run.num_experts == 2 and run.num_updates == 4
    assert not run.model.training
    expected = json.loads((old_run / "expected.json").read_text())
    result = evaluate_run(run, "valid", progress=False)
    for column, value in expected["perplexity"].items():
        assert result.perplexity.loc["overall", column] == pytest.approx(value, rel=1e-5), column
    assert result.log_prior.tolist() == pytest.approx(expected["log_prior"], rel=1e-5)
    assert list(run.history["update"].dropna().astype(int))[-1] == 4
    assert run.tokenizer.decode(run.tokenizer.encode("the of and")) == "the of and"


@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_from_before_the_run_module_resumes(old_run):
    save_dir = old_run / "run"
    result = train(str(old_run / "data-bin"), arch="tiny", method="hMoElp", num_experts=2,
                   max_update=6, decoder_layers=1, tokens_per_sample=32, max_tokens=256,
                   warmup_updates=2, lr=3e-3, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                   decoder_attention_heads=2, mean_pool_gating_network=True,
                   mean_pool_gating_network_encoder_dim=16, dropout=0.0, save_dir=str(save_dir),
                   device="cpu", progress_bar=False, log_interval=1,
                   validate_interval_updates=2)
    assert result.num_updates == 6
    updates = read_checkpoint(save_dir / LAST)["num_updates"]
    assert updates == 6
    # the log goes on from the old run's lines, which stay as they were: 1..4 old, 5..6 new
    old_lines = (OLD_RUN / "run" / "train_log.jsonl").read_text().splitlines()
    lines = (save_dir / "train_log.jsonl").read_text().splitlines()
    assert lines[: len(old_lines)] == old_lines
    train_updates = [json.loads(line)["update"] for line in lines
                     if json.loads(line)["kind"] == "train"]
    assert train_updates == [1, 2, 3, 4, 5, 6]


def test_load_takes_a_save_folder_or_a_file(old_run):
    save_dir = old_run / "run"
    shutil.copy(save_dir / LAST, save_dir / BEST)
    from_folder = Run.load(save_dir, data_bin=old_run / "data-bin")
    from_file = Run.load(save_dir / LAST, data_bin=old_run / "data-bin")
    assert from_folder.checkpoint_path == save_dir / BEST
    assert from_file.checkpoint_path == save_dir / LAST
    assert from_folder.save_dir == from_file.save_dir == save_dir
    with pytest.raises(Exception, match="does not exist"):
        Run.load(save_dir, checkpoint="checkpoint_9.pt")


def test_a_data_bin_with_another_tokenizer_is_refused(old_run, tiny_bin):
    with pytest.raises(MoelabError, match="different tokenizers"):
        Run.load(old_run / "run" / LAST, data_bin=tiny_bin)


def test_a_data_bin_of_another_vocabulary_size_is_refused_without_a_tokenizer_hash(old_run):
    """An older data-bin has no tokenizer_sha256 to compare: its vocabulary size still tells
    another tokenizer apart, and is checked."""
    data_bin = old_run / "data-bin"
    meta = json.loads((data_bin / "meta.json").read_text())
    del meta["tokenizer_sha256"]
    (data_bin / "meta.json").write_text(json.dumps(meta))
    Run.load(old_run / "run" / LAST, data_bin=data_bin)  # the same size: accepted
    meta["vocab_size"] += 1
    (data_bin / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MoelabError, match="different tokenizers"):
        Run.load(old_run / "run" / LAST, data_bin=data_bin)


def _checkpoint_at(epoch: int, batch: int, world_size: int) -> tuple[dict, MixtureLM,
                                                                     torch.optim.Optimizer]:
    """A checkpoint written by `world_size` ranks at (epoch, batch), and a model to restore it."""
    config = RunConfig.from_kwargs("bin", max_update=10, arch="tiny", decoder_layers=1,
                                   decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                                   decoder_attention_heads=2, num_experts=2)
    mconf = model_config(config.model, vocab_size=40, pad_id=3, tokens_per_sample=16)
    model = MixtureLM(mconf)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    state = TrainState(num_updates=7, epoch=epoch, batch_in_epoch=batch, best_valid_loss=3.5)
    meter = {"sums": torch.zeros(9, dtype=torch.float64), "updates": 1, "global_tokens": 5,
             "elapsed": 0.5}
    checkpoint = build_checkpoint(model=model, optimizer=optimizer, state=state, prior_bias=None,
                                  config=config, model_config=mconf,
                                  tokenizer={"sha256": None, "vocab_size": 40},
                                  rng=[ProcessRNG().state_dict()] * world_size,
                                  meters=[meter] * world_size, world_size=world_size,
                                  wall_time=12.0)
    return checkpoint, model, optimizer


@pytest.mark.parametrize("saved_by, epoch, batch, expected", [
    (2, 3, 5, (4, 0)),  # mid-epoch, another world size: the next epoch from its start
    (2, 3, 0, (3, 0)),  # at an epoch's start already: that epoch
    (1, 3, 5, (3, 5)),  # the same world size: exactly where it stopped
])
def test_resuming_with_another_world_size_starts_the_next_epoch(saved_by, epoch, batch,
                                                                 expected):
    """Another number of ranks deals an epoch's batches out differently, so the rest of the
    epoch in progress cannot be told apart from what was trained: a resume goes on from the
    next epoch's start (and says so) instead of training batches twice."""
    checkpoint, model, optimizer = _checkpoint_at(epoch, batch, world_size=saved_by)
    meter = Meter(2, torch.device("cpu"))
    restored = restore_training(checkpoint, "ck.pt", model=model, optimizer=optimizer,
                                meter=meter, rng=ProcessRNG(), rank=0, world_size=1,
                                prior_bias_rate=0.0)
    state, note = restored.state, restored.note
    assert (state.epoch, state.batch_in_epoch) == expected
    assert (state.num_updates, state.best_valid_loss, state.wall_time) == (7, 3.5, 12.0)
    if saved_by == 1:
        assert note is None and restored.meter_restored and meter.updates == 1
    else:
        assert "written by 2 process(es)" in note and "data order changes" in note
        # another world's interval sums are not this rank's
        assert not restored.meter_restored and meter.updates == 0


def test_every_option_that_changes_an_evaluation_has_its_own_cache_file(old_run):
    """A routed, cached-prior, chunk-latent, other-window or other-split result never reads back
    as another's: each is its own file."""
    run = Run.load(old_run / "run" / LAST, data_bin=old_run / "data-bin")
    files = [scores_path(run, "valid", 0),
             scores_path(run, "valid", 0, routing=parse_routing("prefix:8")),
             scores_path(run, "valid", 0, routing=parse_routing("topk:1")),
             scores_path(run, "valid", 0, prior="cached"),
             scores_path(run, "valid", 0, latent="chunk"),
             scores_path(run, "valid", 0, tokens_per_sample=16),
             scores_path(run, "valid", 8),
             scores_path(run, "test", 0)]
    assert len(set(files)) == len(files)
    assert files[0].name == "eval_checkpoint_last_valid_c0.npz"  # the default keeps its name


def test_evaluations_are_cached_on_disk_until_the_checkpoint_changes(old_run, monkeypatch):
    import moelab.eval.cache as run_module

    file = old_run / "run" / LAST
    first = evaluate_run(Run.load(file, data_bin=old_run / "data-bin"), "valid", progress=False)
    cache = old_run / "run" / "eval_checkpoint_last_valid_c0.npz"
    assert cache.is_file()

    calls = []
    real = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = evaluate_run(Run.load(file, data_bin=old_run / "data-bin"), "valid", progress=False)
    assert calls == []  # read from the cache, and the same tables
    assert again.perplexity.equals(first.perplexity)
    assert again.posteriors.equals(first.posteriors)

    # a newer checkpoint (training went on) makes the cached scores stale
    later = cache.stat().st_mtime + 10
    os.utime(file, (later, later))
    evaluate_run(Run.load(file, data_bin=old_run / "data-bin"), "valid", progress=False)
    assert calls == [1]


def test_train_returns_its_run(tiny_bin, tmp_path):
    result = train(str(tiny_bin), arch="tiny", decoder_layers=1, decoder_embed_dim=32,
                   decoder_ffn_embed_dim=64, decoder_attention_heads=2, tokens_per_sample=32,
                   max_tokens=256, method="hMoEup", num_experts=2, max_update=2,
                   save_dir=str(tmp_path), device="cpu", progress_bar=False)
    run = result.run
    assert run.model is result.model and run.num_updates == 2
    assert run.checkpoint_path == tmp_path / LAST
    loaded = Run.load(tmp_path, checkpoint=LAST)
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, run.model.state_dict()[name].cpu()), name


def test_validation_reports_what_evaluation_measures(tiny_bin, tmp_path):
    """The trainer's valid posterior, NMI and confidence are eval-lm's at context window 0."""
    result = train(str(tiny_bin), arch="tiny", decoder_layers=1, decoder_embed_dim=32,
                   decoder_ffn_embed_dim=64, decoder_attention_heads=2, tokens_per_sample=32,
                   max_tokens=256, method="hMoElp", num_experts=3, max_update=6, lr=3e-3,
                   warmup_updates=2, save_dir=str(tmp_path), device="cpu", progress_bar=False)
    evaluated = evaluate_run(result.run, "valid", progress=False, cache=False)
    # float32 scores batched differently: equal to a few 1e-6
    assert result.valid.posterior == pytest.approx(evaluated.posteriors.to_numpy(), abs=1e-4)
    assert result.valid.nmi == pytest.approx(evaluated.clusters["nmi"], abs=1e-6)
    for key, value in result.valid.confidence.items():
        assert value == pytest.approx(evaluated.clusters[key], rel=1e-4), key


def test_the_readmes_python_example_runs(tiny_bin, tmp_path, monkeypatch, capsys):
    """README's Python block as written, on the tiny data-bin and with a smaller model."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'train("data-bin/mix"' in code and "max_update=500" in code
    code = code.replace('"data-bin/mix"', repr(str(tiny_bin))).replace(
        "max_update=500", "max_update=2, decoder_layers=1, decoder_embed_dim=32, "
        "decoder_ffn_embed_dim=64, decoder_attention_heads=2, tokens_per_sample=32, "
        "max_tokens=256, device='cpu', progress_bar=False")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    run, scores = namespace["run"], namespace["scores"]
    assert run.num_experts == 7 and len(run.history) > 0
    assert scores.perplexity.index[0] == "overall"
    assert capsys.readouterr().out.strip()  # the generated text was printed


def test_evaluations_with_another_window_length_are_cached_apart(old_run):
    """A window length other than the model's is its own evaluation, on disk too."""
    run = Run.load(old_run / "run" / LAST, data_bin=old_run / "data-bin")
    default = evaluate_run(run, "valid", progress=False)
    shorter = evaluate_run(run, "valid", tokens_per_sample=16, progress=False)
    assert int(default.summary["tokens_per_sample"]) == 32
    assert int(shorter.summary["tokens_per_sample"]) == 16
    again = Run.load(old_run / "run" / LAST, data_bin=old_run / "data-bin")
    assert int(evaluate_run(again, "valid", tokens_per_sample=16, progress=False
                              ).summary["tokens_per_sample"]) == 16
    assert int(evaluate_run(again, "valid", progress=False).summary["tokens_per_sample"]) == 32
