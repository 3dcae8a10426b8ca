"""A small soak run (benchmarks/soak.py): memory stays flat and logs and checkpoints agree.

"Flat" is a slope: benchmarks/soak.py fits a least-squares line through the resident memory
sampled at every log line after the first validation (each sample taken after a garbage
collection and malloc_trim, so it follows live memory, not the allocator's high-water mark).
The leak the threshold is sized for is the classic one: every update's loss kept with its
autograd graph (`losses.append(loss)` for `loss.item()`), ~70 KiB per update at these sizes;
a clean run measures ~3 KiB per update (the allocator settling in). The second test plants that
leak (`--inject-leak graph`) and shows the same assertion fires.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Threshold of the slope, KiB of resident memory per update: ~7x a clean run's, ~1/3 of the
# planted leak's.
MAX_KIB_PER_UPDATE = 20.0


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _soak(tiny_bin, tmp_path, *, updates: int, leak: str = "none") -> dict:
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--data", str(tiny_bin),
            "--updates", str(updates), "--eval-interval", "50", "--log-interval", "10",
            "--num-experts", "2", "--tokens-per-sample", "32", "--max-tokens", "256",
            "--out", str(tmp_path / "run"), "--json", str(out), "--inject-leak", leak]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(out.read_text())
    print(f"soak ({leak}): RSS {summary['rss_mb_first_eval']} MiB at update 50, "
          f"{summary['rss_mb_last_eval']} MiB at update {updates}, slope "
          f"{summary['rss_slope_kib_per_update']} KiB/update, {summary['seconds']} s")
    assert summary["consistent"], summary["problems"]
    assert summary["inject_leak"] == leak
    # the slope is fitted over every log line after the first validation
    fitted = [u for u, _ in summary["rss_trace"] if u > summary["rss_slope_from_update"]]
    assert fitted == list(range(60, updates + 1, 10)), summary["rss_trace"]
    return summary


def assert_memory_is_flat(summary: dict) -> None:
    slope = summary["rss_slope_kib_per_update"]
    assert slope < MAX_KIB_PER_UPDATE, (
        f"resident memory grows {slope:.1f} KiB per update (threshold {MAX_KIB_PER_UPDATE}): "
        f"something keeps every update's tensors alive; trace {summary['rss_trace']}")


@pytest.mark.slow
def test_soak_memory_is_flat_and_files_stay_consistent(tiny_bin, tmp_path):
    summary = _soak(tiny_bin, tmp_path, updates=300)
    assert [u for u, _ in summary["rss_samples"]] == [0, 50, 100, 150, 200, 250, 300]
    assert_memory_is_flat(summary)
    # single unsettled samples may jump (the allocator's high-water mark), but not by much
    assert summary["rss_max_mb"] - summary["rss_mb_first_eval"] < 80, summary["rss_samples"]


@pytest.mark.slow
def test_soak_slope_catches_a_leaked_graph_per_update(tiny_bin, tmp_path):
    """The named leak, planted: the assertion of the test above fails on it."""
    summary = _soak(tiny_bin, tmp_path, updates=150, leak="graph")
    with pytest.raises(AssertionError, match="KiB per update"):
        assert_memory_is_flat(summary)
    assert summary["rss_slope_kib_per_update"] > 2 * MAX_KIB_PER_UPDATE  # not a near miss


def test_least_squares_slope():
    soak = _soak_module()
    # a zigzag: the least-squares slope is 1/5 (sum dx*dy = 1, sum dx^2 = 5), the endpoints' 1/3
    assert soak.least_squares_slope([(0, 0.0), (1, 1.0), (2, 0.0), (3, 1.0)]) == pytest.approx(0.2)
    assert soak.least_squares_slope([(x, 3 * x + 1) for x in range(10)]) == pytest.approx(3)
    assert soak.least_squares_slope([(5, 1.0), (5, 9.0)]) == 0.0
    assert soak.least_squares_slope([(1, 2.0)]) == 0.0
