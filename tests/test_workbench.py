"""moelab.workbench: what counts as trained, retraining from scratch, the evaluation cache."""

from __future__ import annotations

import json
import shutil

import pytest

from moelab.train import checkpoint as ckpt
from moelab.workbench import DONE_FILE


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
