"""benchmarks/run_notebook.py runs a notebook's cells where neither Jupyter nor IPython is
installed (a bare GPU machine), with parameters replaced from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "run_notebook.py"
WITHOUT_IPYTHON = ("import runpy, sys; sys.modules['IPython'] = None; "
                   "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def write_notebook(path: Path, *cells: str) -> Path:
    path.write_text(json.dumps({"cells": [
        {"cell_type": "code", "source": source.splitlines(keepends=True)} for source in cells]}))
    return path


def run(notebook: Path, *pairs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_IPYTHON, str(RUNNER), str(notebook),
                           *pairs], capture_output=True, text=True, timeout=120)


def test_runs_figures_and_display_without_ipython_and_takes_parameters(tmp_path):
    notebook = write_notebook(
        tmp_path / "nb.ipynb",
        "steps = 1\nname = 'a'\n",
        "%matplotlib inline\n"
        "from matplotlib.figure import Figure\n"
        "from IPython.display import Markdown, display\n"
        "fig = Figure()\n"
        "fig.add_subplot().plot([0, 1])\n"
        "display(fig, Markdown('**read** this'))\n"
        "print('ran', steps, name)\n")
    done = run(notebook, "steps=3", "name=gpu")
    assert done.returncode == 0, done.stderr
    assert "ran 3 gpu" in done.stdout


def test_an_unknown_parameter_is_refused(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", "steps = 1\n", "print('ran')\n")
    done = run(notebook, "step=3")
    assert done.returncode != 0
    assert "no parameter(s) ['step']" in done.stderr
    assert "ran" not in done.stdout


def test_a_parameter_every_notebook_shares_is_taken_though_the_cell_leaves_it_out(tmp_path):
    notebook = write_notebook(tmp_path / "nb.ipynb", "steps = 1\n",
                              "print('ran', preset, runs_dir)\n")
    done = run(notebook, "preset=smoke", "runs_dir=/tmp/r")
    assert done.returncode == 0, done.stderr
    assert "ran smoke /tmp/r" in done.stdout
