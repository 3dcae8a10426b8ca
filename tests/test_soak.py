"""A small soak run (benchmarks/soak.py): memory stays flat and logs and checkpoints agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_memory_is_flat_and_files_stay_consistent(tiny_bin, tmp_path):
    out = tmp_path / "soak.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--data", str(tiny_bin),
            "--updates", "300", "--eval-interval", "50", "--log-interval", "25",
            "--num-experts", "2", "--tokens-per-sample", "32", "--max-tokens", "256",
            "--out", str(tmp_path / "run"), "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(out.read_text())
    print(f"soak: RSS {summary['rss_mb_first_eval']} MiB at update 50, "
          f"{summary['rss_mb_last_eval']} MiB at update 300, {summary['seconds']} s")
    assert summary["consistent"], summary["problems"]
    assert [u for u, _ in summary["rss_samples"]] == [0, 50, 100, 150, 200, 250, 300]
    # A leak of ~130 KiB per update (a batch's tensors kept alive) would pass 40 MiB here; the
    # smaller of the last two samples, since the allocator's high-water mark jumps now and then
    # (a 2,000-update run peaks ~50 MiB above its plateau for single samples).
    tail = min(r for _, r in summary["rss_samples"][-2:])
    assert tail - summary["rss_mb_first_eval"] < 40, summary["rss_samples"]
    assert summary["rss_max_mb"] - summary["rss_mb_first_eval"] < 80, summary["rss_samples"]
