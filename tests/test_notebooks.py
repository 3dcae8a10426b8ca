"""Every notebook in notebooks/ executes headless with small parameters and exports its files.

nbclient runs each notebook in a kernel of the Python running the tests: a `python3` kernelspec
naming sys.executable is written to a temporary folder put first on JUPYTER_PATH, so no other
Python on the machine (a user-level kernelspec, another venv) is picked up. Small parameters are
injected papermill-style: a cell added right after the one tagged "parameters".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"  # shadows any other python3 kernelspec: JUPYTER_PATH comes first
pytestmark = pytest.mark.slow


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


def inject_parameters(nb: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Add a cell setting `values` right after the cell tagged "parameters" (papermill style)."""
    index = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


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


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs one cell tagged 'parameters'"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name} has outputs: strip them before committing")


def test_notebooks_run_in_order_sharing_runs(tiny_bin, tmp_path, kernel):
    """01 trains every method into runs/; 02-04 load them (no training of their own)."""
    params = smoke(tiny_bin)
    results = tmp_path / "results"

    nb = execute("01_train_experts.ipynb", tmp_path, kernel, **params)
    for method in ("dense", "hMoEup", "hMoElp", "sMoEup", "sMoElp"):
        assert (tmp_path / "runs" / method / "checkpoint_best.pt").is_file()
    assert outputs(nb, "image/png") >= 3  # the live plot and the two exported figures
    assert_exported(results, figure_files("training_curves")
                    + figure_files("expert_usage_training"))

    nb = execute("02_responsibilities.ipynb", tmp_path, kernel, **params)
    assert outputs(nb, "image/png") == 2
    assert_exported(results, figure_files("responsibilities_valid")
                    + table_files("expert_usage_valid"))

    nb = execute("03_compare_methods.ipynb", tmp_path, kernel, **params)
    assert_exported(results, figure_files("perplexity_by_domain")
                    + table_files("method_comparison"))
    md = (results / "method_comparison.md").read_text()
    for method in ("dense", "hMoEup", "hMoElp", "sMoEup", "sMoElp"):
        assert f"| {method}" in md
    assert "not a density" in md

    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs").rglob("checkpoint_best.pt")}
    nb = execute("04_sample.ipynb", tmp_path, kernel, **params, method="sMoEup")
    assert shows_widget(nb.cells[-1])  # the sampler
    assert mtimes == {p: p.stat().st_mtime for p in mtimes}, "02-04 must not retrain"


def test_sampling_notebook_runs_alone_from_the_bundled_corpus(tmp_path, kernel):
    """Without data-bin or runs: a small bundled data-bin is built and one method trained."""
    nb = execute("04_sample.ipynb", tmp_path, kernel, data_bin="data-bin", runs_dir="runs",
                 preset="smoke", num_experts=2, corpus_documents=6, vocab_size=400,
                 train_options={"validate_interval_updates": 0, "max_update": 3})
    assert (tmp_path / "data-bin" / "meta.json").is_file()
    assert (tmp_path / "runs" / "hMoEup" / "checkpoint_best.pt").is_file()
    assert shows_widget(nb.cells[-1])
