"""End to end: JupyterLab serves the sampling notebook; headless Chromium runs it, clicks Generate.

Chromium is the system one (Debian's /usr/bin/chromium, or MOELAB_CHROMIUM), driven by the
`playwright` Python package; no browser is downloaded. Without Chromium the test skips, except
under CI (env CI set), where a missing browser is a failure. The screenshot goes to
MOELAB_SCREENSHOT if set, else to tests/artifacts/sampler.png under the test's tmp folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from test_notebooks import NOTEBOOKS, inject_parameters, write_kernelspec

pytestmark = pytest.mark.slow
TOKEN = "moelab-browser-test"
PROMPT = "the of"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")  # session: checked before the session's data-bin is built
def chromium() -> str:
    path = os.environ.get("MOELAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        message = (f"no Chromium at {path}: install Debian's `chromium` (or set MOELAB_CHROMIUM "
                   "to a Chromium binary) to run the browser test")
        if in_ci():
            pytest.fail(message + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({server.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} in {timeout}s:\n{log.read_text()}")


@pytest.fixture
def lab(chromium, tiny_bin, smoke_workbench, tmp_path):
    """A JupyterLab server whose root holds 04_sample.ipynb set up for a tiny trained run."""
    wb = smoke_workbench()
    wb.train(["hMoEup"])
    root = tmp_path / "lab"
    root.mkdir()
    nb = inject_parameters(nbformat.read(NOTEBOOKS / "04_sample.ipynb", as_version=4), {
        "data_bin": str(tiny_bin), "runs_dir": str(wb.runs_dir), "preset": "smoke",
        "num_experts": 3, "method": "hMoEup", "prompt": PROMPT, "max_new_tokens": 24})
    nbformat.write(nb, root / "04_sample.ipynb")

    # Everything Jupyter reads or writes lives under tmp_path: no user settings, no news popup.
    settings = tmp_path / "settings" / "@jupyterlab"
    for plugin, values in {
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ,
           "JUPYTER_PATH": str(write_kernelspec(tmp_path / "jupyter")),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "TQDM_DISABLE": "1"}
    port = free_port()
    log = tmp_path / "jupyterlab.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
             "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_server(f"{base}/api/status?token={TOKEN}", server, log)
        yield base, log
    finally:
        server.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def screenshot_path(tmp_path: Path) -> Path:
    path = Path(os.environ.get("MOELAB_SCREENSHOT") or tmp_path / "tests" / "artifacts" /
                "sampler.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_sampler_in_jupyterlab_generates_text(chromium, lab, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci():
            pytest.fail("the playwright package is missing: pip install -e '.[test]'")
        pytest.skip("the playwright package is missing: pip install -e '.[test]'")
    base, log = lab
    shot = screenshot_path(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            try:
                page.goto(f"{base}/lab/tree/04_sample.ipynb?token={TOKEN}")
                page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell",
                                       timeout=90_000)
                # our kernel (test_notebooks.write_kernelspec) is up and idle
                page.wait_for_function(
                    "() => /moelab tests\\) \\| Idle/.test(document.body.innerText)",
                    timeout=90_000)
                page.locator(".lm-MenuBar-content").get_by_text("Run", exact=True).click()
                page.locator(".lm-Menu-content").get_by_text("Run All Cells", exact=True).click()
                button = page.locator(".widget-button", has_text="Generate")
                button.wait_for(timeout=180_000)

                page.locator(".widget-dropdown select").select_option(label="expert 1")
                button.click()
                panel = page.locator("pre.moelab-sample")
                panel.wait_for(timeout=60_000)
                page.wait_for_function(
                    """([prompt]) => {
                        const p = document.querySelector('pre.moelab-sample');
                        return p && !p.textContent.includes('\\u258c')
                            && p.textContent.length > prompt.length;
                    }""", arg=[PROMPT], timeout=120_000)
                header = page.locator(".widget-html", has=panel).inner_text()
                text = panel.inner_text()
                panel.scroll_into_view_if_needed()
            except Exception as e:  # a timeout says little without the server's side
                raise AssertionError(f"{e}\n--- JupyterLab log (end) ---\n"
                                     f"{log.read_text()[-4000:]}") from e
            finally:
                page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert "expert 1" in header, header
    assert text.startswith(PROMPT) and len(text.strip()) > len(PROMPT), text
    assert shot.stat().st_size > 10_000
