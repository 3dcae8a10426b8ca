"""Execute every notebook at one preset into docs/notebooks/, with its outputs and figures, so a
reader sees them without running anything (GitHub renders the executed copies).

    python benchmarks/publish_notebooks.py --preset cpu

Each notebook of notebooks/ runs in order with nbclient, in a kernel of this Python, from one work
folder (--work, default build/notebooks-<preset>/): they share its data-bin and runs/, so every
method trains once (01 trains them, the others reuse them; runs already finished there are
reused, so a second publication only evaluates). The preset and the data-bin are injected after
each parameters cell, papermill-style, with any --param NAME=VALUE into the notebooks that have
that parameter (a smaller preset may need one: `--param 'remedies={...}'` for 06's warm start,
whose 50 updates are more than smoke's 6). Figures are embedded as PNG at --dpi, which keeps each
file small. The notebooks under notebooks/ are never written: the executed copies go to --out,
with a README.md that says the command, the date, the machine, torch's version and threads.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

from moelab.report.machine import device_name
from moelab.workbench import notebook_defaults

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"  # shadows any other python3 kernelspec: JUPYTER_PATH comes first


def kernel_environment(folder: Path, dpi: int) -> dict[str, str]:
    """A kernelspec of this very Python and an IPython profile that embeds figures as PNG at
    `dpi`, in `folder`; -> the environment variables that make the kernel use them."""
    spec = folder / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python",
        "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline"}}))
    profile = folder / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    # set in the profile, not in a cell, so the published notebooks show only their parameters
    (profile / "ipython_kernel_config.py").write_text(
        "c.InlineBackend.figure_formats = {'png'}\n"
        f"c.InlineBackend.print_figure_kwargs = {{'bbox_inches': 'tight', 'dpi': {dpi}}}\n")
    return {"JUPYTER_PATH": str(folder / "jupyter"), "IPYTHONDIR": str(folder / "ipython"),
            "TQDM_DISABLE": "1"}  # progress bars would only fill the published outputs


def inject_parameters(nb: nbformat.NotebookNode, values: dict) -> nbformat.NotebookNode:
    """Add a cell setting `values` right after the cell tagged "parameters" (papermill style)."""
    index = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


def parameters(nb: nbformat.NotebookNode) -> set[str]:
    """The names the notebook's parameters cell assigns, and those every notebook shares."""
    cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return set(notebook_defaults()) | {
        target.id for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Assign)
        for target in node.targets if isinstance(target, ast.Name)}


def literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def training_minutes(runs: Path) -> float:
    """What the runs under `runs` spent training, validation excluded, from their logs (a run
    continued at equal compute counts only its own part)."""
    total = 0.0
    for log in runs.rglob("train_log.jsonl"):
        lines = log.read_text(encoding="utf-8").splitlines()
        total += float(json.loads(lines[-1]).get("train_seconds", 0.0)) if lines else 0.0
    for done in runs.rglob("at-*/*/train_log.jsonl"):  # its log starts as a copy of the run's
        plain = done.parents[2] / done.parent.name / "train_log.jsonl"
        if plain.is_file():
            total -= float(json.loads(plain.read_text().splitlines()[-1]).get("train_seconds", 0))
    return total / 60


def readme(args: argparse.Namespace, seconds: dict[str, float], out: Path, work: Path) -> str:
    rows = "\n".join(f"| [{name}]({name}) | {s / 60:.1f} | "
                     f"{(out / name).stat().st_size / 1e6:.2f} |" for name, s in seconds.items())
    return f"""# The notebooks, executed

Executed copies of the notebooks in [`notebooks/`](../../notebooks), at the `{args.preset}` preset,
with their outputs and figures: GitHub shows them as they ran. To run them yourself, open the
ones in `notebooks/`; these are regenerated, all in one go, by

    python benchmarks/publish_notebooks.py --preset {args.preset}

which runs each notebook in order in a Jupyter kernel, sharing one data-bin and one `runs/`
folder (01 trains every method, 02-06 reuse its runs), and writes the copies here.

- date: {datetime.now(timezone.utc):%Y-%m-%d} (UTC)
- machine: {device_name("cpu")}, shared with other work while it ran
- torch {torch.__version__}, {torch.get_num_threads()} threads; float32
- this command's wall time: {sum(seconds.values()) / 60:.0f} minutes; the runs it trained or
  found finished in its work folder spent {training_minutes(work / "runs"):.0f} minutes training

| notebook | minutes | MB |
|---|---|---|
{rows}

Every number comes from one training seed at a small size: read them as the notebooks' prose
says, not as a comparison of the methods (`benchmarks/demo_seeds.py` and
`benchmarks/remedies.py` compare over seeds), and times (`train time (s)`) as measured
on a machine whose load changed while the runs trained. The sampler of `04_sample` is a
widget, which GitHub does not draw: run that notebook to use it.
"""


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="gpu, cpu or smoke (default: cpu)")
    parser.add_argument("--work", type=Path, default=None,
                        help="the shared data-bin, runs and results (default: "
                             "build/notebooks-<preset>)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "notebooks")
    parser.add_argument("--dpi", type=int, default=72, help="of the embedded PNG figures")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter (a Python literal) for the notebooks that have it")
    parser.add_argument("--notebooks", nargs="+", default=None, metavar="NAME",
                        help="only these (e.g. 06_remedies.ipynb); the README is written when "
                             "all run")
    return parser


def main() -> None:
    args = arguments().parse_args()
    params = {name: literal(value) for name, value in (p.split("=", 1) for p in args.param)}
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.notebooks:
        paths = [NOTEBOOKS / name for name in args.notebooks]
    work = (args.work or ROOT / "build" / f"notebooks-{args.preset}").resolve()
    out = args.out.resolve()
    if out == NOTEBOOKS.resolve():
        raise SystemExit("--out is notebooks/: the published copies never replace the sources")
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="moelab-publish-") as tmp:
        os.environ.update(kernel_environment(Path(tmp), args.dpi))
        for path in paths:
            started = time.perf_counter()
            print(f"{path.name} ...", flush=True)
            nb = nbformat.read(path, as_version=4)
            values = {"preset": args.preset, "data_bin": "data-bin", **params}
            nb = inject_parameters(nb, {k: v for k, v in values.items() if k in parameters(nb)})
            NotebookClient(nb, kernel_name=KERNEL, timeout=None, allow_errors=False,
                           resources={"metadata": {"path": str(work)}}).execute()
            nbformat.write(nb, out / path.name)
            seconds[path.name] = time.perf_counter() - started
            print(f"{path.name}: {seconds[path.name] / 60:.1f} minutes, "
                  f"{(out / path.name).stat().st_size / 1e6:.2f} MB", flush=True)
    if not args.notebooks:
        (out / "README.md").write_text(readme(args, seconds, out, work))


if __name__ == "__main__":
    main()
