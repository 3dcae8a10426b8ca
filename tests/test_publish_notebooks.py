"""benchmarks/publish_notebooks.py executes the notebooks into docs/notebooks/: it never writes
over the sources, and gives each notebook only the parameters it has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "publish_notebooks.py"
sys.path.insert(0, str(SCRIPT.parent))
import publish_notebooks  # noqa: E402


def test_the_source_notebooks_are_never_the_output(tmp_path):
    before = {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--work",
                           str(tmp_path), "--out", str(ROOT / "notebooks")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "never replace the sources" in done.stderr
    assert before == {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}


def test_a_parameter_goes_only_to_the_notebooks_that_have_it():
    remedies = nbformat.read(ROOT / "notebooks" / "06_remedies.ipynb", as_version=4)
    sample = nbformat.read(ROOT / "notebooks" / "04_sample.ipynb", as_version=4)
    assert "remedies" in publish_notebooks.parameters(remedies)
    assert "remedies" not in publish_notebooks.parameters(sample)
    for nb in (remedies, sample):  # the shared ones every notebook takes
        assert {"preset", "data_bin", "runs_dir"} <= publish_notebooks.parameters(nb)


def test_by_default_the_copies_go_to_docs_notebooks():
    """Run without --out, the command writes where the README links, never over the sources."""
    out = publish_notebooks.arguments().parse_args([]).out.resolve()
    assert out == (ROOT / "docs" / "notebooks").resolve()
