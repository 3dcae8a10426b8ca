"""Every notebook in notebooks/ reads as a study, executes headless with small parameters and
exports its files into its own folder.

nbclient runs each notebook in a kernel of the Python running the tests: a `python3` kernelspec
naming sys.executable is written to a temporary folder put first on JUPYTER_PATH, so no other
Python on the machine (a user-level kernelspec, another venv) is picked up. Small parameters are
injected papermill-style: a cell added right after the one tagged "parameters".
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from moelab.workbench import notebook_defaults, notebook_workbench

# the papermill-style injection the published notebooks use (benchmarks/publish_notebooks.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from publish_notebooks import inject_parameters

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"  # shadows any other python3 kernelspec: JUPYTER_PATH comes first


def write_kernelspec(folder: Path) -> Path:
    """A kernelspec named KERNEL for this very Python; put `folder` on JUPYTER_PATH to use it."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (moelab tests)", "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    return folder


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> Path:
    return write_kernelspec(tmp_path_factory.mktemp("jupyter"))


@pytest.fixture
def kernel(jupyter_path, monkeypatch) -> str:
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("TQDM_DISABLE", "1")  # progress bars add nothing to a log
    return KERNEL


def execute(name: str, workdir: Path, kernel: str, **values) -> nbformat.NotebookNode:
    nb = inject_parameters(nbformat.read(NOTEBOOKS / name, as_version=4), values)
    NotebookClient(nb, kernel_name=kernel, timeout=600, allow_errors=False,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    nbformat.write(nb, workdir / name)  # the executed copy, for a look when a test fails
    return nb


def outputs(nb: nbformat.NotebookNode, mime: str) -> int:
    return sum(mime in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def shows_widget(cell: nbformat.NotebookNode) -> bool:
    return any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in cell.get("outputs", []))


def assert_exported(folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        assert path.is_file(), f"{path} was not exported (have {sorted(folder.iterdir())})"
        assert path.stat().st_size > 0, f"{path} is empty"


def smoke(tiny_bin: Path) -> dict:
    return {"data_bin": str(tiny_bin), "runs_dir": "runs", "results_dir": "results",
            "preset": "smoke", "num_experts": 3}


def figure_files(stem: str) -> list[str]:
    return [f"{stem}.{ext}" for ext in ("png", "svg", "pdf")]


def table_files(stem: str) -> list[str]:
    return [f"{stem}.{ext}" for ext in ("csv", "md", "tex")]


def snapshot(folder: Path) -> dict[Path, int]:
    """Every file under `folder` (relative path) with its modification time."""
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def assert_exports_only_its_own(results: Path, before: dict[Path, int], notebook: str) -> None:
    """The notebook added files under results/<its name>/ and rewrote none it found there."""
    after = snapshot(results)
    rewritten = sorted(str(p) for p, mtime in before.items() if after.get(p) != mtime)
    assert not rewritten, f"{notebook} overwrote exports of another notebook: {rewritten}"
    stray = sorted(str(p) for p in set(after) - set(before) if p.parts[0] != Path(notebook).stem)
    assert not stray, f"{notebook} exported outside its own folder: {stray}"


def notebooks() -> list[tuple[Path, nbformat.NotebookNode]]:
    return [(path, nbformat.read(path, as_version=4)) for path in sorted(NOTEBOOKS.glob("*.ipynb"))]


def test_notebooks_are_committed_without_outputs():
    for path, nb in notebooks():
        nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs one cell tagged 'parameters'"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name} has outputs: strip them before committing")


def test_each_notebook_opens_with_the_question_it_answers():
    for path, nb in notebooks():
        first = nb.cells[0]
        assert first.cell_type == "markdown" and "**Question:" in first.source, (
            f"{path.name} must open with a markdown cell that states its **Question:**")
        question = first.source.split("**Question:", 1)[1].split("**", 1)[0]
        assert question.rstrip().endswith("?"), f"{path.name}: the question ends with '?'"


def test_each_notebook_sets_up_with_one_call_into_its_own_export_folder():
    """The parameters cell comes first (benchmarks/run_notebook.py overrides the first code
    cell); after it one notebook_workbench call, named after the notebook, and no copied
    Workbench(...) construction."""
    for path, nb in notebooks():
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), (
            f"{path.name}: the parameters cell must be the first code cell")
        calls = [c for c in code if "notebook_workbench(" in c.source]
        assert len(calls) == 1, f"{path.name} must set up with one notebook_workbench call"
        assert f'notebook_workbench(globals(), "{path.stem}")' in calls[0].source, (
            f"{path.name} must export into its own folder, {path.stem}")
        assert not any("Workbench(" in c.source for c in code), (
            f"{path.name} builds a Workbench by hand instead of notebook_workbench")


def test_every_figure_has_markdown_beside_it_that_says_what_to_look_for():
    for path, nb in notebooks():
        for i, cell in enumerate(nb.cells):
            draws = cell.cell_type == "code" and any(
                call in cell.source for call in ("save_figure(", "plt.subplots(", "LiveCurves("))
            if draws:
                before = nb.cells[i - 1]
                assert before.cell_type == "markdown" and \
                    "what to look for" in " ".join(before.source.lower().split()), (
                        f"{path.name} cell {i} draws a figure without markdown before it "
                        "saying what to look for")


def test_no_notebook_repeats_the_parameters_every_notebook_shares():
    """data_bin, runs_dir, preset, ... have one default (notebook_defaults); a parameters cell
    that assigned one again would be a second place to change it."""
    shared = set(notebook_defaults())
    for path, nb in notebooks():
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        assigned = {target.id for node in ast.walk(ast.parse(cell.source))
                    if isinstance(node, ast.Assign) for target in node.targets
                    if isinstance(target, ast.Name)}
        assert not assigned & shared, (
            f"{path.name} assigns {sorted(assigned & shared)} in its parameters cell: leave "
            "them to moelab.workbench.notebook_defaults()")


def test_the_shared_parameters_a_notebook_leaves_out_keep_their_defaults():
    wb = notebook_workbench({"preset": "smoke", "methods": ["hMoEup"]}, "01_train_experts")
    defaults = notebook_defaults()
    assert (wb.data_bin, wb.runs_dir) == (Path(defaults["data_bin"]), Path(defaults["runs_dir"]))
    assert wb.results_dir == Path(defaults["results_dir"]) / "01_train_experts"
    assert (wb.preset, wb.train_options) == ("smoke", defaults["train_options"])


def test_notebook_workbench_reads_the_parameters_and_gives_each_notebook_its_folder(tmp_path):
    parameters = {"data_bin": str(tmp_path / "bin"), "runs_dir": str(tmp_path / "runs"),
                  "results_dir": str(tmp_path / "results"), "preset": "smoke",
                  "num_experts": 3, "train_options": {"max_update": 2},
                  "methods": ["hMoEup"], "split": "valid"}  # a notebook's own: not options
    first = notebook_workbench(parameters, "01_train_experts")
    second = notebook_workbench(parameters, "02_responsibilities")
    assert (first.preset, first.num_experts, first.train_options) == ("smoke", 3,
                                                                      {"max_update": 2})
    assert first.data_bin == second.data_bin == tmp_path / "bin"
    assert first.runs_dir == second.runs_dir == tmp_path / "runs"  # 02 reuses 01's runs
    assert first.results_dir == tmp_path / "results" / "01_train_experts"
    assert second.results_dir == tmp_path / "results" / "02_responsibilities"


@pytest.mark.slow
def test_how_it_works_runs_one_em_step_on_a_real_batch(tiny_bin, tmp_path, kernel):
    nb = execute("00_how_it_works.ipynb", tmp_path, kernel, data_bin=str(tiny_bin),
                 preset="smoke", num_experts=3)
    assert outputs(nb, "image/png") == 1  # the posterior before and after the step
    assert outputs(nb, "text/html") >= 4  # the batch, scores, prior, posterior tables
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    # the soft-EM loss is the marginal -log p(x | c) the notebook computes by hand, prior included
    by_hand, soft = re.search(r"by hand .*?: (-?[\d.]+); sMoElp's loss: (-?[\d.]+)",
                              printed).groups()
    assert by_hand == soft
    assert "gained responsibility on" in printed


@pytest.mark.slow
def test_notebooks_run_in_order_sharing_runs(tiny_bin, tmp_path, kernel):
    """01 trains every method into runs/; 02-04 load them (no training of their own); each
    exports into results/<notebook>/ and rewrites no file another notebook exported."""
    params = smoke(tiny_bin)
    results = tmp_path / "results"

    nb = execute("01_train_experts.ipynb", tmp_path, kernel, **params)
    assert_exports_only_its_own(results, {}, "01_train_experts")
    for method in ("dense", "hMoEup", "hMoElp", "sMoEup", "sMoElp"):
        assert (tmp_path / "runs" / method / "checkpoint_best.pt").is_file()
    assert outputs(nb, "image/png") >= 3  # the live plot and the two exported figures
    assert_exported(results / "01_train_experts", figure_files("training_curves")
                    + figure_files("expert_usage_training"))

    before = snapshot(results)
    nb = execute("02_responsibilities.ipynb", tmp_path, kernel, **params)
    assert_exports_only_its_own(results, before, "02_responsibilities")
    assert outputs(nb, "image/png") == 3
    assert_exported(results / "02_responsibilities", figure_files("responsibilities_valid")
                    + table_files("expert_usage_valid") + figure_files("expert_usage_training")
                    + figure_files("expert_profiles_valid") + table_files("expert_profiles_valid"))

    before = snapshot(results)
    nb = execute("03_compare_methods.ipynb", tmp_path, kernel, **params)
    assert_exports_only_its_own(results, before, "03_compare_methods")
    ours = results / "03_compare_methods"
    assert_exported(ours, figure_files("perplexity_by_domain") + table_files("method_comparison")
                    + table_files("method_comparison_equal_flops")
                    + figure_files("compute_curves") + figure_files("training_curves"))
    for name in ("method_comparison", "method_comparison_equal_flops"):
        md = (ours / f"{name}.md").read_text()
        for method in ("dense", "hMoEup", "hMoElp", "sMoEup", "sMoElp"):
            assert f"| {method}" in md
        assert "not a density" in md
    assert "At equal training compute" in (ours / "method_comparison_equal_flops.md").read_text()
    assert outputs(nb, "text/markdown") == 1  # the reading of this run, from its numbers

    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("checkpoint_best.pt")}
    before = snapshot(results)
    nb = execute("04_sample.ipynb", tmp_path, kernel, **params, method="sMoEup")
    assert_exports_only_its_own(results, before, "04_sample")
    assert shows_widget(nb.cells[-1])  # the sampler
    assert mtimes == {p: p.stat().st_mtime for p in mtimes}, "02-04 must not retrain"


@pytest.mark.slow
def test_sampling_notebook_runs_alone_from_the_bundled_corpus(tmp_path, kernel):
    """Without data-bin or runs: a small bundled data-bin is built and one method trained."""
    nb = execute("04_sample.ipynb", tmp_path, kernel, data_bin="data-bin", runs_dir="runs",
                 preset="smoke", num_experts=2, corpus_documents=6, vocab_size=400,
                 train_options={"validate_interval_updates": 0, "max_update": 3})
    assert (tmp_path / "data-bin" / "meta.json").is_file()
    assert (tmp_path / "runs" / "hMoEup" / "checkpoint_best.pt").is_file()
    assert shows_widget(nb.cells[-1])


@pytest.mark.slow
def test_routing_notebook_draws_routed_against_full_curves(tiny_bin, tmp_path, kernel):
    """05 alone on the smoke preset: trains its method when missing, draws the curves and
    exports the figure and the table behind it."""
    nb = execute("05_routing.ipynb", tmp_path, kernel, **smoke(tiny_bin))
    assert outputs(nb, "image/png") == 1
    assert outputs(nb, "text/html") == 2  # the curve's table and one routed evaluation
    ours = tmp_path / "results" / "05_routing"
    assert_exported(ours, figure_files("routing_hMoEup_test") + table_files("routing_hMoEup_test"))
    table = (ours / "routing_hMoEup_test.csv").read_text()
    assert table.splitlines()[0].startswith(",prefix,top_k,documents")
    assert len(table.splitlines()) == 1 + 4 * 2  # every (M, K') of the parameters


@pytest.mark.slow
def test_remedies_notebook_trains_each_remedy_beside_the_plain_runs(tiny_bin, tmp_path, kernel):
    """06 alone on the smoke preset: the plain runs where 01 puts them, each remedy's run of the
    collapsing method in a folder of its own with the remedy's options, and its exports."""
    remedies = {"sinkhorn": {"balance": "sinkhorn"}, "prior-bias": {"prior_bias_rate": 0.01},
                "warm-start": {"init_clusters": "tfidf", "init_updates": 2}}
    nb = execute("06_remedies.ipynb", tmp_path, kernel, **smoke(tiny_bin), remedies=remedies)
    runs = tmp_path / "runs"
    for method in ("hMoEup", "hMoElp"):
        assert (runs / method / "checkpoint_best.pt").is_file()
    for name, options in remedies.items():
        done = json.loads((runs / f"remedy-{name}" / "hMoElp" / "done.json").read_text())
        assert options.items() <= done["options"].items(), f"{name} trained without its options"
    assert outputs(nb, "image/png") == 3
    ours = tmp_path / "results" / "06_remedies"
    assert_exported(ours, figure_files("expert_usage_plain") + figure_files("expert_usage_remedies")
                    + figure_files("responsibilities_remedies_test")
                    + table_files("plain_em_test") + table_files("remedies"))
    rows = [line.split(",", 1)[0] for line in (ours / "remedies.csv").read_text().splitlines()]
    assert rows[1:] == ["hMoEup plain", "hMoElp plain", "hMoElp sinkhorn", "hMoElp prior-bias",
                        "hMoElp warm-start"]

