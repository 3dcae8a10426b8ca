"""moelab.report: figures (and their PNG/SVG/PDF export) and tables (CSV/Markdown/LaTeX)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from moelab import report
from moelab.eval.lm import summarize
from moelab.report.tables import format_value, latex_escape

matplotlib.use("Agg")

DOMAINS = ["alpha", "beta", "gamma"]


def fake_result(K: int, seed: int = 0, scale: float = 1.0):
    """An EvalResult of 12 documents in 3 domains where expert d % K is best for domain d."""
    rng = np.random.default_rng(seed)
    domain_ids = np.arange(12) % 3
    ll = -rng.uniform(300, 400, (12, K)) * scale
    ll[np.arange(12), domain_ids % K] += 40.0
    return summarize(ll, np.log(np.full(K, 1 / K)), np.full(12, 100), domain_ids, DOMAINS,
                     tokens_per_sample=32, context_window=0)


def fake_history(K: int, updates: int = 5) -> pd.DataFrame:
    rows = []
    for u in range(1, updates + 1):
        mass = np.full(K, 1 / K)
        rows.append({"kind": "train", "update": u, "loss": 6 - 0.1 * u, "tokens_per_s": 1000.0,
                     "wall": 2.0 * u, "train_flops": 1e9 * K * u, "train_seconds": 1.5 * u,
                     **{f"posterior_mass_{k}": mass[k] for k in range(K)}})
    # validation took 1 s of wall time and no training time
    rows.append({"kind": "valid", "update": updates, "loss": 5.5, "wall": 2.0 * updates + 1,
                 "train_flops": 1e9 * K * updates, "train_seconds": 1.5 * updates,
                 **{f"posterior_mass_{k}": 1 / K for k in range(K)}})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def results():
    return {"dense": fake_result(1), "hMoEup": fake_result(3, 1, 0.9),
            "sMoElp": fake_result(3, 2, 0.95)}


def check_exports(paths, stem):
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.svg", f"{stem}.pdf"]
    png, svg, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG") and b"<svg" in svg[:2000] and pdf.startswith(b"%PDF")


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


# ----------------------------------------------------------------------------- figures


def test_responsibility_heatmap_writes_values_in_cells_and_exports(results, tmp_path):
    fig = report.responsibility_heatmap(results["hMoEup"], title="hMoEup")
    cells = texts(fig)
    assert len(cells) == 3 * 3  # domains x experts
    values = results["hMoEup"].responsibilities.to_numpy()
    assert cells[0] == f"{values[0, 0]:.2f}"
    image = fig.axes[0].images[0]
    assert image.get_clim() == (0.0, 1.0)  # a fixed scale: runs compare at a glance
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == DOMAINS
    check_exports(report.save_figure(fig, tmp_path / "sub" / "heat"), "heat")
    with pytest.raises(ValueError, match="unknown figure format.*'bmpx'"):
        report.save_figure(fig, tmp_path / "other" / "heat", ("png", "bmpx"))
    assert not (tmp_path / "other").exists()  # nothing half-written


def test_heatmap_of_several_methods_has_one_panel_each(results):
    fig = report.responsibility_heatmap({k: v for k, v in results.items() if k != "dense"})
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title(loc="left") for ax in panels] == ["hMoEup", "sMoElp"]


def test_perplexity_plot_marks_the_oracle_as_a_bound(results, tmp_path):
    fig = report.perplexity_by_domain(results)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["dense", "hMoEup", "sMoElp"]
    assert "bound" in labels[3] and "oracle" in labels[3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["overall", *DOMAINS]
    check_exports(report.save_figure(fig, tmp_path / "ppl"), "ppl")


def test_training_curves_and_usage_from_history_frames(tmp_path):
    histories = {"dense": fake_history(1), "hMoEup": fake_history(3)}
    fig = report.training_curves(histories)
    train_ax, valid_ax = fig.axes[:2]
    assert len(train_ax.lines) == 2 and len(valid_ax.lines) == 2
    check_exports(report.save_figure(fig, tmp_path / "curves"), "curves")
    fig = report.expert_usage(histories)  # dense (K = 1) is left out
    assert [ax.get_title(loc="left") for ax in fig.axes if ax.get_visible()] == ["hMoEup"]
    with pytest.raises(ValueError, match="mixture"):
        report.expert_usage({"dense": fake_history(1)})


def test_figures_from_a_real_training_run(smoke_workbench, tmp_path):
    wb = smoke_workbench(results_dir=tmp_path)
    history = wb.run("hMoEup").history
    assert {"posterior_mass_0", "posterior_mass_2", "tokens_per_s"} <= set(history.columns)
    wb.save_figure(report.expert_usage({"hMoEup": history}), "usage")
    wb.save_figure(report.training_curves({"hMoEup": history}), "curves")
    assert all((tmp_path / f"{s}.{e}").stat().st_size > 0
               for s in ("usage", "curves") for e in ("png", "svg", "pdf"))


def test_live_curves_redraw_into_one_display(monkeypatch):
    shown = []

    class Handle:
        def update(self, fig):
            shown.append(("update", fig))

    def display(fig, display_id=False):
        shown.append(("display", fig))
        return Handle()

    monkeypatch.setattr("IPython.display.display", display)
    live = report.LiveCurves(interval=0.0)
    callbacks = live.callbacks("hMoEup")
    callbacks["on_log"]({"kind": "train", "update": 1, "loss": 6.0})
    callbacks["on_log"]({"kind": "train", "update": 2, "loss": 5.0})
    callbacks["on_eval"]({"kind": "valid", "update": 2, "loss": 5.5})
    assert [kind for kind, _ in shown] == ["display", "update", "update"]
    assert len(shown[-1][1].axes[1].lines) == 1  # the validation point


# ----------------------------------------------------------------------------- tables


@pytest.fixture(scope="module")
def table(results):
    runs = [report.MethodRun(name, valid=r, test=r, history=fake_history(r.usage.shape[0]))
            for name, r in results.items()]
    return report.method_table(runs)


def test_method_run_of_reads_the_log_of_a_save_dir(smoke_workbench, results):
    wb = smoke_workbench()
    save_dir = wb.train(["hMoEup"])["hMoEup"]
    run = report.MethodRun.of("hMoEup", save_dir, results["hMoEup"])
    assert run.history["update"].max() == 6 and run.test is None
    assert report.MethodRun.of("dense", None, results["dense"]).history is None


def test_method_table_has_one_row_per_method(table, results):
    assert list(table.index) == ["dense", "hMoEup", "sMoElp"]
    for column in ("valid ppl", "valid oracle ppl", "test ppl", "test oracle ppl", "alpha ppl",
                   "experts used", "usage entropy", "NMI", "ARI", "tokens/s",
                   "train time (s)", "updates", "train FLOPs"):
        assert column in table.columns
    r = results["hMoEup"]
    assert table.loc["hMoEup", "test ppl"] == pytest.approx(r.perplexity.loc["overall",
                                                                          "mixture"])
    assert table.loc["hMoEup", "beta ppl"] == pytest.approx(r.perplexity.loc["beta", "mixture"])
    assert table.loc["hMoEup", "NMI"] == pytest.approx(r.clusters["nmi"])
    assert table.loc["hMoEup", "tokens/s"] == 1000.0
    # what the run cost: its updates, model FLOPs and training time without validation
    assert table.loc["hMoEup", "train time (s)"] == 7.5
    assert table.loc["hMoEup", "updates"] == 5 and table.loc["hMoEup", "train FLOPs"] == 1.5e10
    assert table.loc["dense", "train FLOPs"] == 5e9
    assert (table["test oracle ppl"] <= table["test ppl"] + 1e-9).all()
    assert any("bound" in note for note in table.attrs["notes"])


def test_method_run_without_test_or_history():
    table = report.method_table([report.MethodRun("hMoEup", valid=fake_result(3))])
    assert math.isnan(table.loc["hMoEup", "test ppl"])
    assert math.isnan(table.loc["hMoEup", "tokens/s"])
    assert "valid split" in table.attrs["notes"][1]
    assert "| hMoEup |" in report.to_markdown(table).replace("  ", " ")


def test_export_table_to_csv_markdown_and_latex(table, tmp_path):
    paths = report.export_table(table, tmp_path / "t" / "methods")
    assert [p.name for p in paths] == ["methods.csv", "methods.md", "methods.tex"]
    back = pd.read_csv(paths[0], index_col="method")
    np.testing.assert_allclose(back["test ppl"], table["test ppl"])  # CSV: full precision
    md = paths[1].read_text().splitlines()
    assert md[0].startswith("| method") and set(md[1]) <= set("|-: ")
    assert len({line.count("|") for line in md[:5]}) == 1  # every row has every column
    assert "not a density" in paths[1].read_text()
    tex = paths[2].read_text()
    assert "\\begin{tabular}" in tex and "\\toprule" in tex and "\\bottomrule" in tex
    assert tex.count("\\\\") == 1 + len(table)  # header + rows
    with pytest.raises(ValueError, match="csv, md or tex"):
        report.export_table(table, tmp_path / "x", formats=("xlsx",))
    with pytest.raises(ValueError, match="'xlsx'"):  # checked before anything is written
        report.export_table(table, tmp_path / "y" / "t", formats=("csv", "xlsx"))
    assert not (tmp_path / "y").exists()


def test_cluster_table(results):
    table = report.cluster_table({k: v for k, v in results.items() if k != "dense"})
    assert list(table.columns[:6]) == ["K", "experts used", "usage entropy", "purity", "NMI",
                                       "ARI"]
    assert table.loc["hMoEup", ["expert 0", "expert 1", "expert 2"]].sum() == pytest.approx(1.0)


def test_number_formatting_and_escaping():
    assert format_value(1234.5) == "1,234" or format_value(1234.5) == "1,235"
    assert format_value(12.345) == "12.35" or format_value(12.345) == "12.34"
    assert format_value(0.12345) == "0.123"
    assert format_value(-0.0) == "0.000"
    assert format_value(float("nan")) == "–"
    assert format_value(7) == "7"
    assert latex_escape("gene_ontology 50% & $x#") == r"gene\_ontology 50\% \& \$x\#"
    df = pd.DataFrame({"a|b": [1.5]}, index=pd.Index(["x|y"], name="m"))
    assert "x\\|y" in report.to_markdown(df) and "a\\|b" in report.to_markdown(df)


# ----------------------------------------------------------------------------- confidence


def flat_aligned_result(K: int = 2):
    """12 documents of 500 tokens, argmax aligned with the domains by 0.3 nats: NMI 1, flat."""
    domain_ids = np.arange(12) % 2
    ll = np.full((12, K), -1500.0)
    ll[np.arange(12), domain_ids] += 0.3
    return summarize(ll, np.log(np.full(K, 1 / K)), np.full(12, 500), domain_ids, DOMAINS[:2],
                     tokens_per_sample=32, context_window=0)


CONFIDENCE = {"mean max posterior": "mean_max_posterior",
              "posterior entropy": "mean_posterior_entropy", "expert spread": "expert_spread"}


def test_method_and_cluster_tables_show_the_confidence_beside_the_clustering(results):
    flat = flat_aligned_result()
    assert flat.clusters["nmi"] == 1.0
    mixtures = {"hMoEup": results["hMoEup"], "sMoElp": flat}
    cluster = report.cluster_table(mixtures)
    runs = [report.MethodRun(name, valid=r, test=r) for name, r in mixtures.items()]
    method = report.method_table(runs)
    for table in (cluster, method):
        columns = list(table.columns)
        at = columns.index("ARI")
        assert columns[at + 1 : at + 4] == list(CONFIDENCE)  # right beside NMI/ARI
        for name, r in mixtures.items():
            for column, key in CONFIDENCE.items():
                assert table.loc[name, column] == pytest.approx(r.clusters[key]), column
        # the flat one reads as flat: ~1/K and no spread, next to its perfect NMI
        assert table.loc["sMoElp", "mean max posterior"] == pytest.approx(
            1 / (1 + math.exp(-0.3)))
        assert table.loc["sMoElp", "expert spread"] == pytest.approx(0.15 / 500)
        assert table.loc["hMoEup", "mean max posterior"] > 0.99
        notes = " ".join(table.attrs["notes"])
        assert "mean max posterior < 0.9" in notes and "expert spread < 0.01" in notes
        assert "not a clean split" in notes
    md = report.to_markdown(cluster)
    assert "| mean max posterior |" in md.replace("  ", " ") and "not a clean split" in md


# ----------------------------------------------------------------------------- seeds


def seed_tables(seeds=(1, 2, 3)) -> dict[int, pd.DataFrame]:
    return {s: report.method_table([report.MethodRun("dense", fake_result(1, s)),
                                    report.MethodRun("hMoEup", fake_result(3, s + 10, 0.9))])
            for s in seeds}


def test_over_seeds_keeps_each_seed_and_gives_mean_and_std(tmp_path):
    tables = seed_tables()
    long = report.over_seeds(tables)
    assert list(long["seed"]) == [1, 1, 2, 2, 3, 3, "mean", "mean", "std", "std"]
    values = np.array([t.loc["hMoEup", "valid ppl"] for t in tables.values()])
    rows = long.loc["hMoEup"].set_index("seed")["valid ppl"]
    assert rows["mean"] == pytest.approx(values.mean())
    assert rows["std"] == pytest.approx(values.std(ddof=1))
    csv, md, tex = report.export_table(long, tmp_path / "methods")
    back = pd.read_csv(csv, index_col=0)
    assert list(back["seed"].astype(str)) == ["1", "1", "2", "2", "3", "3", "mean", "mean",
                                              "std", "std"]
    text = md.read_text()
    assert f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" in text
    assert "| hMoEup |     3 |" in text and "seeds 1, 2, 3" in text
    assert "±" in tex.read_text()


def test_a_figure_over_seeds_has_error_bars():
    per_seed = {"hMoEup": [fake_result(3, s, 0.9) for s in range(3)], "dense": fake_result(1)}
    fig = report.perplexity_by_domain(per_seed)
    bars = [c for c in fig.axes[0].collections if c.get_segments()]
    ppl = np.array([r.perplexity.loc["overall", "mixture"] for r in per_seed["hMoEup"]])
    spans = [np.ptp(seg[:, 1]) for c in bars for seg in c.get_segments()]
    assert any(span == pytest.approx(2 * ppl.std(ddof=1)) for span in spans)
    curves = report.training_curves({"hMoEup": [fake_history(3), fake_history(3, 4)]})
    assert any(type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")
               for c in curves.axes[0].collections)
    single = report.training_curves({"hMoEup": fake_history(3)})
    assert not single.axes[0].collections  # one seed: no band


def test_a_figure_names_its_cpu_by_model_not_just_cpu(monkeypatch, tmp_path):
    """platform.processor() is empty on most Linux systems: the model comes from cpuinfo."""
    import os
    import platform

    from moelab.report import machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: Example\nmodel name\t: Example CPU 9000\n")
    monkeypatch.setattr(machine, "CPUINFO", info)
    assert machine.device_name("cpu") == f"Example CPU 9000 ({os.cpu_count()} cores)"
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    fallback = platform.processor() or platform.machine() or "unknown CPU"
    assert machine.device_name("cpu") == f"{fallback} ({os.cpu_count()} cores)"
