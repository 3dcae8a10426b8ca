"""The training log: one JSON object per line in SAVE_DIR/train_log.jsonl, read back as pandas.

Lines have `"kind": "train"` (one per --log-interval updates) or `"kind": "valid"`. A resumed run
appends to the same file, after dropping lines past the checkpoint it resumed from, so the file
reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

LOG_FILE = "train_log.jsonl"


def append_record(save_dir: str | Path, record: dict) -> None:
    path = Path(save_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_history(save_dir: str | Path, num_updates: int) -> None:
    """Drop lines logged after update `num_updates` (work lost when the run stopped unsaved)."""
    path = Path(save_dir) / LOG_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _update_of(line) <= num_updates]
    tmp = path.with_name(f".{LOG_FILE}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _update_of(line: str) -> float:
    try:
        return json.loads(line).get("update", 0)
    except json.JSONDecodeError:  # a line cut short by a crash
        return float("inf")


def read_history(save_dir: str | Path) -> pd.DataFrame:
    """All log lines as a DataFrame, one row per line, columns as logged.

    List-valued fields (per-expert `posterior_mass`, and `model_posterior_mass` where a remedy
    reshapes the posterior trained on) become one column per expert: `posterior_mass_0`,
    `posterior_mass_1`, ... so they plot directly.
    """
    path = Path(save_dir) / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}; is {save_dir} a --save-dir of "
                                "`moelab train`?")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a last line cut short by a crash
    frame = pd.DataFrame.from_records(records)
    for column in [c for c in frame.columns
                   if frame[c].map(lambda v: isinstance(v, list)).any()]:
        width = int(frame[column].map(lambda v: len(v) if isinstance(v, list) else 0).max())
        for k in range(width):
            frame[f"{column}_{k}"] = frame[column].map(
                lambda v, k=k: v[k] if isinstance(v, list) and k < len(v) else float("nan"))
        frame = frame.drop(columns=column)
    return frame
