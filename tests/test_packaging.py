"""The repository's promises about itself: entry points, environment.yml, lint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_has_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {_name(r) for r in project["dependencies"] + extras["test"] + extras["corpora"]}
    conda_names = {"torch": "pytorch"}
    text = (ROOT / "environment.yml").read_text()
    env_lines = text[text.index("dependencies:"):].splitlines()
    listed = {_name(line.strip()[2:]) for line in env_lines if line.startswith("  - ")}
    assert {conda_names.get(n, n) for n in wanted} <= listed
    extra = listed - {conda_names.get(n, n) for n in wanted} - {"python", "pip", "pip:"}
    assert not extra, f"environment.yml lists {extra} which pyproject.toml does not"


def test_python_dash_m_moelab_runs():
    out = subprocess.run([sys.executable, "-m", "moelab", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("moelab ")


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- ci:test -->" in readme
    assert "ci:test" in (ROOT / ".ci" / "run").read_text()


def test_code_is_ruff_clean():
    local = Path(sys.executable).parent / "ruff"  # installed with the test extras
    ruff = str(local) if local.exists() else shutil.which("ruff")
    assert ruff, "ruff is missing: install the test extras (pip install -e '.[test]')"
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
