"""Run a notebook's code cells in one namespace, headless, without Jupyter (for machines that have
moelab's core dependencies but not JupyterLab, such as a bare GPU box).

    python benchmarks/run_notebook.py notebooks/01_train_experts.ipynb preset=smoke runs_dir=/tmp/r

NAME=VALUE arguments replace the parameters cell's assignments (VALUE is a Python literal, or a
plain string); the parameters every notebook shares (moelab.workbench.notebook_defaults: preset,
runs_dir, ...) are accepted though the cell leaves them to their defaults. IPython magics are
skipped; figures are saved by the notebook's own calls, not shown. Tests execute the notebooks
with nbclient in a real kernel (tests/test_notebooks.py).
"""

from __future__ import annotations

import ast
import json
import sys
import time
import types
from pathlib import Path


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _headless_display() -> None:
    """moelab's live curves call IPython.display; without IPython, showing is a no-op."""
    try:
        import IPython.display  # noqa: F401
    except ImportError:
        ipython = types.ModuleType("IPython")
        # matplotlib reads IPython.version_info when a figure is made; from 8.24 on it does
        # nothing more with IPython.
        ipython.version_info = (8, 24, 0)
        ipython.display = types.ModuleType("IPython.display")
        ipython.display.display = lambda *args, **kwargs: None
        ipython.display.clear_output = lambda *args, **kwargs: None
        ipython.display.Markdown = str  # shown by display(), which shows nothing here
        sys.modules["IPython"], sys.modules["IPython.display"] = ipython, ipython.display


def main() -> None:
    path, *pairs = sys.argv[1:]
    overrides = {name: _literal(value) for name, value in (p.split("=", 1) for p in pairs)}
    import matplotlib

    matplotlib.use("Agg")
    _headless_display()
    cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        source = "".join(line for line in cell["source"] if not line.lstrip().startswith("%"))
        started = time.perf_counter()
        exec(compile(source, f"{path}[cell {i}]", "exec"), namespace)
        if i == 0:  # the parameters cell
            unknown = set(overrides) - set(namespace)
            if unknown:  # the parameters every notebook shares need not be in its cell
                from moelab.workbench import notebook_defaults

                unknown = sorted(unknown - set(notebook_defaults()))
            if unknown:
                raise SystemExit(f"{path} has no parameter(s) {unknown}")
            namespace.update(overrides)
        print(f"cell {i}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
