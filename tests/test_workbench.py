"""moelab.workbench: what counts as trained, retraining from scratch, the evaluation cache."""

from __future__ import annotations

import json
import shutil

import pytest

from moelab.train import checkpoint as ckpt
from moelab.workbench import DONE_FILE, TRAIN_PRESETS


def test_retrain_starts_from_scratch_even_with_a_previous_checkpoint(smoke_workbench, tmp_path,
                                                                      capsys):
    wb = smoke_workbench(runs_dir=tmp_path, num_experts=2)
    wb.train("hMoEup")
    save_dir = wb.save_dir("hMoEup")
    assert (save_dir / ckpt.previous_path(ckpt.LAST)).is_file()  # the smoke preset saves twice
    assert wb.is_trained("hMoEup")
    capsys.readouterr()
    wb.train("hMoEup", retrain=True)
    assert "resumed" not in capsys.readouterr().err
    assert json.loads((save_dir / DONE_FILE).read_text())["num_updates"] == 6


def test_changed_options_make_a_run_untrained(smoke_workbench, tmp_path):
    wb = smoke_workbench(runs_dir=tmp_path, num_experts=2)
    wb.train("hMoEup")
    assert smoke_workbench(runs_dir=tmp_path, num_experts=2).is_trained("hMoEup")
    assert not smoke_workbench(runs_dir=tmp_path, num_experts=2,
                               train_options={"lr": 1e-3}).is_trained("hMoEup")
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    assert smoke_workbench(runs_dir=moved, num_experts=2).is_trained("hMoEup")


def test_evaluation_is_cached_on_disk_until_the_checkpoint_changes(smoke_workbench, tmp_path):
    wb = smoke_workbench(runs_dir=tmp_path, num_experts=2)
    first = wb.evaluate("hMoEup", "valid")
    cache = wb.save_dir("hMoEup") / "eval_valid_c0.npz"
    assert cache.is_file()
    again = smoke_workbench(runs_dir=tmp_path, num_experts=2).evaluate("hMoEup", "valid")
    assert again.perplexity.equals(first.perplexity)
    written = cache.stat().st_mtime_ns
    wb.train("hMoEup", retrain=True)  # a new checkpoint: the cache is stale
    smoke_workbench(runs_dir=tmp_path, num_experts=2).evaluate("hMoEup", "valid")
    assert cache.stat().st_mtime_ns > written


def test_a_bundled_data_bin_made_for_another_preset_is_refused(tmp_path):
    from moelab.errors import MoelabError
    from moelab.workbench import ensure_data_bin

    data_bin = ensure_data_bin(tmp_path / "bin", documents_per_domain=4, vocab_size=500,
                               valid_fraction=0.2, test_fraction=0.2)
    again = dict(documents_per_domain=4, valid_fraction=0.2, test_fraction=0.2)
    assert ensure_data_bin(data_bin, vocab_size=500, **again) == data_bin  # same settings: reused
    with pytest.raises(MoelabError, match="vocab_size 500 \\(wanted 600\\).*another folder"):
        ensure_data_bin(data_bin, vocab_size=600, **again)


def test_a_folder_that_is_not_a_data_bin_is_never_written_into(tmp_path):
    from moelab.errors import MoelabError
    from moelab.workbench import ensure_data_bin

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "mine.txt").write_text("keep me")
    with pytest.raises(MoelabError, match="not empty and holds no data-bin"):
        ensure_data_bin(tmp_path / "corpus", documents_per_domain=4, vocab_size=500)
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["mine.txt"]


@pytest.fixture
def trained_copy(smoke_workbench, tmp_path):
    """A Workbench on its own runs folder holding a copy of the session's trained hMoEup run,
    for tests that retrain or delete files (the session's run is trained once and shared)."""
    shared = smoke_workbench()
    shared.train("hMoEup")
    shutil.copytree(shared.save_dir("hMoEup"), tmp_path / "hMoEup")
    return smoke_workbench(runs_dir=tmp_path)


def test_evaluations_with_another_context_window_are_their_own(smoke_workbench):
    wb = smoke_workbench()
    plain = wb.evaluate("hMoEup", "valid", context_window=0)
    windowed = wb.evaluate("hMoEup", "valid", context_window=16)
    assert plain.summary["context_window"] == 0
    assert windowed.summary["context_window"] == 16
    assert wb.evaluate("hMoEup", "valid", context_window=16) is windowed  # cached in memory


def test_retraining_drops_the_evaluations_kept_in_memory(trained_copy):
    wb = trained_copy
    before = wb.evaluate("hMoEup", "valid")
    wb.train_options = {"max_update": 3}  # a different checkpoint, so its numbers differ
    wb.train("hMoEup", retrain=True)
    after = wb.evaluate("hMoEup", "valid")
    assert after is not before
    assert not after.perplexity.equals(before.perplexity)
    assert wb.run("hMoEup").num_updates == 3


def test_a_run_without_its_best_checkpoint_is_not_trained(trained_copy):
    """Notebooks load checkpoint_best.pt: done.json alone would send them to a missing file."""
    assert trained_copy.is_trained("hMoEup")
    (trained_copy.save_dir("hMoEup") / ckpt.BEST).unlink()
    assert not trained_copy.is_trained("hMoEup")


def test_a_run_trained_for_another_max_update_is_not_trained(smoke_workbench):
    smoke_workbench().train("hMoEup")
    preset_updates = TRAIN_PRESETS["smoke"]["max_update"]
    assert preset_updates != 9
    assert smoke_workbench(train_options={"max_update": preset_updates}).is_trained("hMoEup")
    assert not smoke_workbench(train_options={"max_update": 9}).is_trained("hMoEup")
