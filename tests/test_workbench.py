"""moelab.workbench: what counts as trained, retraining from scratch, the evaluation cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from moelab.eval.attribution import DomainClassifier, training_documents
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


def test_the_home_seed_keeps_the_single_seed_layout_and_options(smoke_workbench, tmp_path):
    single = smoke_workbench(runs_dir=tmp_path)
    seeded = smoke_workbench(runs_dir=tmp_path, seeds=[1, 2])
    assert single.seeds == [1] and seeded.home_seed == 1
    assert seeded.save_dir("hMoEup", 1) == single.save_dir("hMoEup") == tmp_path / "hMoEup"
    assert seeded.train_options_for("hMoEup", 1) == single.train_options_for("hMoEup")
    assert "seed" not in single.train_options_for("hMoEup")  # existing runs stay trained
    assert seeded.save_dir("hMoEup", 2) == tmp_path / "seed2" / "hMoEup"
    assert seeded.train_options_for("hMoEup", 2)["seed"] == 2
    with pytest.raises(ValueError, match="distinct seeds"):
        smoke_workbench(seeds=[2, 2])


def test_several_seeds_give_each_seeds_row_and_mean_and_std(smoke_workbench, one_thread):
    from moelab import report

    wb = smoke_workbench(seeds=[1, 2])
    table = wb.method_table(["hMoEup"])
    assert list(table["seed"]) == [1, 2, "mean", "std"]
    by_seed = table.set_index("seed")["test ppl"]
    assert by_seed[1] != by_seed[2]  # another seed is another run
    assert by_seed["mean"] == pytest.approx((by_seed[1] + by_seed[2]) / 2)
    assert by_seed["std"] == pytest.approx(abs(by_seed[1] - by_seed[2]) / 2 ** 0.5)
    assert table.attrs["threads"] == 1 and "torch threads" in table.attrs["notes"][-1]
    assert wb.training_threads("hMoEup", 2) == 1
    one = report.method_table(wb.method_runs(["hMoEup"], seed=2))
    assert one.loc["hMoEup", "test ppl"] == by_seed[2]


def test_the_same_seed_and_threads_give_identical_numbers(smoke_workbench, tmp_path, one_thread):
    first = smoke_workbench(runs_dir=tmp_path / "a", seeds=[3])
    again = smoke_workbench(runs_dir=tmp_path / "b", seeds=[3])
    a, b = (wb.method_table(["hMoEup"]) for wb in (first, again))
    columns = [c for c in a.columns if c not in ("tokens/s", "train time (s)")]
    pd.testing.assert_frame_equal(a[columns], b[columns])


def test_attribution_labels_each_experts_samples(smoke_workbench):
    wb = smoke_workbench()
    samples = wb.expert_samples("hMoEup", per_expert=2, max_new_tokens=8)
    assert sorted(samples) == [0, 1, 2] and all(len(s) == 2 for s in samples.values())
    assert samples == wb.expert_samples("hMoEup", per_expert=2, max_new_tokens=8)
    assert any(len(set(texts)) > 1 for texts in samples.values())  # one generator goes on
    table = wb.attribution("hMoEup", samples=samples)
    valid = wb.evaluate("hMoEup", "valid")
    used = valid.usage["share"] >= 1 / (4 * len(valid.usage))  # eval-lm's experts used
    owned = valid.responsibilities.idxmax().where(used, "")
    assert table["owned domain"].to_dict() == owned.to_dict()
    for k, texts in samples.items():  # a label the classifier gave one of the expert's samples
        labels = wb.domain_classifier().predict([t for t in texts if t.strip()])
        assert table.loc[f"expert_{k}", "samples read as"] in (labels or [""])
        assert table.loc[f"expert_{k}", "samples"] == 2


def test_the_workbench_classifier_is_fit_on_the_training_split(smoke_workbench, tiny_bin):
    """The samples are attributed by a classifier that never saw the valid or test documents."""
    on_train = DomainClassifier.fit(*training_documents(tiny_bin, split="train"))
    np.testing.assert_array_equal(smoke_workbench().domain_classifier().model.coef_,
                                  on_train.model.coef_)


def test_equal_compute_trains_each_cheaper_method_to_the_most_expensive_runs_flops(
        smoke_workbench, tmp_path, one_thread):
    """The comparison at equal compute: the most expensive method's run sets the budget, every
    cheaper one continues its own run until it has spent as much, and all validate at the
    same FLOP points."""
    import json

    from moelab.train.history import LOG_FILE

    wb = smoke_workbench(runs_dir=tmp_path / "runs")
    methods = ["dense", "hMoEup", "sMoEup"]
    assert wb.budget(methods) == "sMoEup"  # soft EM backpropagates all K experts
    budget = wb.flops_spent("sMoEup")
    wb.train(methods, at="flops")
    interval = wb.validation_interval()
    updates = {}
    for method in methods:
        save_dir = wb.save_dir(method, at="sMoEup")
        lines = [json.loads(x) for x in (save_dir / LOG_FILE).read_text().splitlines()]
        train = [x for x in lines if x["kind"] == "train"]
        # trained until it had spent the budget, and not one update longer
        assert train[-1]["train_flops"] >= budget > (train[-2]["train_flops"]
                                                     if method != "sMoEup" else 0)
        updates[method] = train[-1]["update"]
        # a continuation of its run at equal updates, whose log it starts with
        own = (wb.save_dir(method) / LOG_FILE).read_text().splitlines()
        assert (save_dir / LOG_FILE).read_text().splitlines()[: len(own) - 1] == own[:-1]
        # validated at the first update whose count passed each multiple of the one interval
        validated = {x["update"] for x in lines if x["kind"] == "valid"}
        for k in range(1, int(budget // interval) + 1):
            assert next(x["update"] for x in train
                        if x["train_flops"] >= k * interval) in validated, (method, k)
    assert wb.save_dir("sMoEup", at="sMoEup") == wb.save_dir("sMoEup")
    assert updates["dense"] > updates["hMoEup"] > updates["sMoEup"] == 6
    table = wb.method_table(methods, at="flops")
    assert table["updates"].to_dict() == updates
    assert (table["train FLOPs"] >= budget).all()
    assert table.attrs["notes"][0].startswith("At equal training compute")
    at_updates = wb.method_table(methods)
    assert (at_updates["updates"] == 6).all()
    assert at_updates.loc["dense", "train FLOPs"] < budget / 2
    assert wb.is_trained("dense", at="sMoEup")


def test_a_variant_trains_the_same_method_with_its_options_into_its_own_folder(smoke_workbench,
                                                                               tmp_path):
    wb = smoke_workbench(runs_dir=tmp_path, num_experts=2)
    wb.train("hMoElp")
    balanced = wb.variant("sinkhorn", balance="sinkhorn")
    assert balanced.save_dir("hMoElp") == tmp_path / "sinkhorn" / "hMoElp"
    assert (balanced.results_dir, balanced.data_bin) == (wb.results_dir, wb.data_bin)
    assert not balanced.is_trained("hMoElp")  # the plain run is not the balanced one
    balanced.train("hMoElp")

    def options(bench):
        return json.loads((bench.save_dir("hMoElp") / DONE_FILE).read_text())["options"]
    assert options(balanced)["balance"] == "sinkhorn" and "balance" not in options(wb)
    assert wb.is_trained("hMoElp") and balanced.is_trained("hMoElp")


def test_a_variant_keeps_the_workbenchs_own_training_options(smoke_workbench, tmp_path):
    wb = smoke_workbench(runs_dir=tmp_path, train_options={"max_update": 3})
    balanced = wb.variant("sinkhorn", balance="sinkhorn")
    assert balanced.train_options == {"max_update": 3, "balance": "sinkhorn"}
    assert balanced.train_options_for("hMoEup")["max_update"] == 3


def test_a_variant_named_like_a_folder_of_the_plain_runs_is_refused(smoke_workbench, tmp_path):
    wb = smoke_workbench(runs_dir=tmp_path)
    for name in ("hMoEup", "seed2", "at-sMoElp", "", "a/b"):
        with pytest.raises(ValueError, match="share a folder"):
            wb.variant(name, balance="sinkhorn")


def test_a_run_reads_the_workbenchs_data_bin_not_the_path_it_trained_with(smoke_workbench,
                                                                          tmp_path, tiny_bin):
    """A checkpoint records its data-bin as given (often relative to where training ran);
    the workbench that finds the run trained loads it on its own data-bin."""
    shared = smoke_workbench()
    shared.train("hMoEup")
    shutil.copytree(shared.save_dir("hMoEup"), tmp_path / "runs" / "hMoEup")
    shutil.copytree(tiny_bin, tmp_path / "moved-bin")
    wb = smoke_workbench(runs_dir=tmp_path / "runs", data_bin=tmp_path / "moved-bin")
    assert wb.is_trained("hMoEup")
    assert wb.run("hMoEup").data_bin == tmp_path / "moved-bin"

