"""`moelab demo`: the whole study end to end at smoke size, and its resume."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from moelab.cli import main
from moelab.demo import DemoConfig, reading
from moelab.errors import MoelabError


@pytest.mark.slow
def test_demo_writes_the_report_and_skips_finished_work(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--preset", "smoke", "--out", str(out), "--methods", "dense,hMoEup,sMoElp"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    for method in ("dense", "hMoEup", "sMoElp"):
        assert f"| {method}" in report
    assert "## Reading" in report and "## Samples" in report
    # the precision the runs trained in, read from their checkpoints (float32 on a CPU)
    assert ("Precision: M-step float32, E-step float32, validation and evaluation float32"
            in report)
    for stem in ("tables/methods", "tables/methods_equal_flops", "tables/clusters"):
        for suffix in ("csv", "md", "tex"):
            assert (out / f"{stem}.{suffix}").stat().st_size > 0
    for stem in ("compute_curves", "perplexity_by_domain", "training_curves", "responsibilities",
                 "expert_usage", "expert_profiles", "routing"):
        for suffix in ("png", "svg", "pdf"):
            assert (out / "figures" / f"{stem}.{suffix}").stat().st_size > 0
    links = re.findall(r"\]\((figures/[^)]+)\)", report)
    assert len(links) == 7 and all((out / link).is_file() for link in links)
    # equal compute first: every method trained until it had spent sMoElp's FLOPs
    assert report.index("## Methods at equal training compute") < report.index(
        "## Methods at equal updates")
    assert "- **At equal training compute.**" in report
    at_flops = pd.read_csv(out / "tables/methods_equal_flops.csv", index_col=0)
    assert at_flops.loc["dense", "updates"] > at_flops.loc["hMoEup", "updates"] > 6
    assert at_flops.loc["sMoElp", "updates"] == 6
    assert (at_flops["train FLOPs"] >= at_flops.loc["sMoElp", "train FLOPs"]).all()
    # the headline mixture's experts are profiled (moelab.eval.profiles) and routed
    # (moelab.eval.routing), not another method's
    assert "## What each expert has learnt (hMoEup, valid split)" in report
    assert "## Routed inference (hMoEup, test split)" in report
    routing = pd.read_csv(out / "tables/routing.csv")
    assert sorted(set(routing["prefix"])) == [16, 32, 64, 128]
    assert sorted(set(routing["top_k"])) == [1, 2]
    table = pd.read_csv(out / "tables/methods.csv", index_col=0)
    assert list(table.index) == ["dense", "hMoEup", "sMoElp"]
    assert (table["test oracle ppl"] <= table["test ppl"] + 1e-6).all()
    checkpoint = out / "runs" / "hMoEup" / "checkpoint_best.pt"
    mtime = checkpoint.stat().st_mtime
    capsys.readouterr()

    assert main(argv) == 0  # a second run reuses the runs and their evaluations
    assert checkpoint.stat().st_mtime == mtime
    assert "using the trained run" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_resumes_an_unfinished_run(tmp_path, capsys):
    from moelab.train import read_history

    out = tmp_path / "demo"
    main(["demo", "--preset", "smoke", "--out", str(out), "--methods", "hMoEup"])
    save_dir = out / "runs" / "hMoEup"
    (save_dir / "done.json").unlink()  # as if the run had been killed after its last checkpoint
    before = read_history(save_dir)
    capsys.readouterr()
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--methods", "hMoEup"]) == 0
    assert "resuming the unfinished run" in capsys.readouterr().out  # not trained from scratch
    assert (save_dir / "done.json").is_file()
    assert read_history(save_dir)["update"].max() == before["update"].max()
    assert len(read_history(save_dir)) == len(before)  # no update trained twice


def test_bad_methods_and_experts_are_refused():
    with pytest.raises(MoelabError, match="choose from"):
        DemoConfig(methods=["hMoE"])
    with pytest.raises(MoelabError, match="--num-experts must be >= 2"):
        DemoConfig(num_experts=1)


def test_reading_says_plainly_when_the_mixture_does_not_beat_dense():
    table = pd.DataFrame({"test ppl": [100.0, 120.0], "NMI": [0.0, 0.9], "ARI": [0.0, 0.8],
                          "experts used": [1, 7], "K": [1, 7], "usage entropy": [0.0, 1.9]},
                         index=["dense", "hMoEup"])
    text = "\n".join(reading(table, max_update=200))
    assert "does not beat" in text and "line up with the domains" in text
    table.loc["hMoEup", "test ppl"] = 90.0
    text = "\n".join(reading(table, max_update=200))
    # one seed's verdict says that it is one seed
    assert "in this one training seed it beats" in text and "compare over several" in text


@pytest.mark.parametrize(("used", "says"), [(1, "collapsed onto 1 expert,"),
                                            (3, "collapsed onto 3 experts"),
                                            (5, "2 experts left unused; no collapse"),
                                            (7, "No collapse")])
def test_reading_calls_a_learned_prior_collapsed_only_when_most_experts_are_idle(used, says):
    table = pd.DataFrame({"test ppl": [100.0], "experts used": [used], "K": [7],
                          "usage entropy": [1.0]}, index=["hMoElp"])
    text = "\n".join(reading(table, max_update=200))
    assert says in text


def test_a_dense_only_report_links_only_the_figures_it_made(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--methods", "dense"]) == 0
    links = re.findall(r"\]\((figures/[^)]+)\)", (out / "report.md").read_text())
    assert links == ["figures/compute_curves.png", "figures/perplexity_by_domain.png",
                     "figures/training_curves.png"]
    assert all((out / link).is_file() for link in links)


def flat_aligned_table(shift: float, tokens: int = 500) -> pd.DataFrame:
    """method_table of dense and hMoEup whose argmax matches the 2 domains by `shift` nats."""
    import numpy as np

    from moelab import report
    from moelab.eval.lm import summarize

    domain_ids = np.arange(8) % 2
    ll = np.full((8, 2), -3.0 * tokens)
    ll[np.arange(8), domain_ids] += shift

    def result(ll):
        K = ll.shape[1]
        return summarize(ll, np.log(np.full(K, 1 / K)), np.full(8, tokens), domain_ids,
                         ["a", "b"], tokens_per_sample=8, context_window=0)

    runs = [report.MethodRun("dense", valid=result(ll[:, :1])),
            report.MethodRun("hMoEup", valid=result(ll)),
            report.MethodRun("sMoElp", valid=result(ll))]
    return report.method_table(runs)


def test_reading_never_calls_a_flat_posterior_a_clean_split():
    table = flat_aligned_table(shift=0.5)  # NMI 1 from argmaxes half a nat apart
    assert (table.loc[["hMoEup", "sMoElp"], "NMI"] == 1.0).all()
    assert table.loc["hMoEup", "mean max posterior"] < 0.7
    text = "\n".join(reading(table, max_update=200))
    domains = next(line for line in text.splitlines() if "find the domains" in line)
    assert "line up with the domains" not in domains
    assert "flat" in domains and "must not be read as a clean split" in domains
    flat = next(line for line in text.splitlines() if "Flat posteriors" in line)
    assert "sMoElp" in flat and "dense" not in flat  # K = 1 has no split to misread
    assert "used in name only" in text  # the learned prior's "no collapse" is qualified too


def test_reading_calls_a_sure_posterior_with_high_nmi_a_split():
    table = flat_aligned_table(shift=50.0)  # 0.1 nats/token ahead: sure, and experts differ
    text = "\n".join(reading(table, max_update=200))
    assert "hMoEup's experts line up with the domains: NMI 1.00" in text
    assert "flat" not in text and "clean split" not in text


def test_reading_calls_a_sharp_split_of_near_identical_experts_flat():
    table = flat_aligned_table(shift=40.0, tokens=10_000)  # posterior ~1, 0.002 nats/token apart
    assert table.loc["hMoEup", "mean max posterior"] > 0.99
    text = "\n".join(reading(table, max_update=200))
    assert "line up with the domains" not in text and "0.0020 nats/token" in text


def test_seeds_flag_takes_a_count_or_a_list():
    from moelab.cli.demo import _seeds

    assert _seeds("3") == [1, 2, 3]
    assert _seeds("1,4,7") == [1, 4, 7]
    assert _seeds("5,") == [5]
    with pytest.raises(MoelabError, match="distinct seeds"):
        DemoConfig(seeds=[2, 2])
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "two"])


@pytest.mark.slow
def test_demo_over_seeds_gives_mean_std_each_seed_and_attribution(tmp_path, one_thread):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--methods", "dense,hMoEup",
                 "--seeds", "2", "--attribution-samples", "2"]) == 0
    report = (out / "report.md").read_text()
    assert "Training seeds 1, 2; torch threads 1 in training, 1 in evaluation" in report
    table = pd.read_csv(out / "tables/methods.csv", index_col=0)
    assert list(table["seed"].astype(str)) == ["1", "1", "2", "2", "mean", "mean", "std", "std"]
    assert (out / "runs" / "seed2" / "hMoEup" / "checkpoint_best.pt").is_file()
    assert " ± " in (out / "tables/methods.md").read_text() and " ± " in report
    assert "means over 2 training seeds" in report
    attribution = pd.read_csv(out / "tables/attribution.csv", index_col=0)
    experts = int(table.loc["hMoEup", "K"].iloc[0])
    assert sorted(set(attribution["seed"])) == [1, 2] and len(attribution) == 2 * experts
    assert "## Samples you can attribute" in report and "over 2 seeds of its experts" in report


def test_reading_gives_the_equal_compute_verdict_first():
    at_updates = pd.DataFrame({"test ppl": [200.0, 170.0], "experts used": [1, 7], "K": [1, 7],
                               "usage entropy": [0.0, 1.9], "updates": [400, 400],
                               "NMI": [0.0, 0.9], "ARI": [0.0, 0.8]},
                              index=["dense", "hMoEup"])
    at_flops = pd.DataFrame({"test ppl": [110.0, 160.0, 150.0], "updates": [3600, 1100, 400]},
                            index=["dense", "hMoEup", "sMoElp"])
    lines = reading(at_updates, max_update=400, flops_table=at_flops, budget_method="sMoElp")
    assert lines[0].startswith("- **At equal training compute.**")
    assert "No mixture beats dense at equal compute" in lines[0]
    assert "9.0x the updates of sMoElp" in lines[0]
    assert "dense 110.00 after 3600 updates" in lines[0]
    assert "hMoEup vs dense at equal updates" in lines[1] and "it beats" in lines[1]
    at_flops.loc["sMoElp", "test ppl"] = 100.0
    first = reading(at_updates, max_update=400, flops_table=at_flops, budget_method="sMoElp")[0]
    assert "sMoElp is below dense at equal compute" in first and "No mixture" not in first
