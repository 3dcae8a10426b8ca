"""What the notebooks share: one data-bin, a `runs/` folder of trained methods, a results folder.

Every notebook starts from the same parameters and builds a `Workbench`; missing pieces are made
on demand, so each notebook also runs alone:

- the data-bin is preprocessed from the bundled corpus when its folder has no meta.json;
- `wb.run("hMoEup")` trains that method into runs_dir/hMoEup unless a checkpoint is already there
  (notebook 01 trains them all; 02-04 reuse them);
- figures and tables are exported into results_dir.

Training sizes come from a preset: `gpu` (picked by `auto` when CUDA is available), `cpu` (a few
minutes per method on a laptop) and `smoke` (seconds; for CI).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from moelab.data import PreprocessConfig, bundled_corpus, preprocess, read_meta
from moelab.data.preprocess import STAGING_PREFIX
from moelab.errors import MoelabError
from moelab.evaluate import EvalResult
from moelab.presets import STUDIES
from moelab.train import Run, train
from moelab.train import checkpoint as ckpt
from moelab.train.objectives import METHODS

# The presets' parts, by name (moelab.presets.STUDIES is where they are set).
TRAIN_PRESETS: dict[str, dict] = {name: study.train for name, study in STUDIES.items()}
DATA_PRESETS: dict[str, dict] = {name: study.data for name, study in STUDIES.items()}
EXPERT_PRESETS: dict[str, int] = {name: study.num_experts for name, study in STUDIES.items()}
CHECKPOINT = ckpt.BEST
SUBSET_FILE = "bundled-subset.jsonl"  # the bundled documents a quick preset keeps
DONE_FILE = "done.json"  # written when a run has reached its max_update with these options


def resolve_preset(preset: str) -> str:
    """`auto` -> `gpu` when CUDA is available, else `cpu`; other names are checked."""
    if preset == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose auto, {', '.join(TRAIN_PRESETS)}")
    return preset


def ensure_data_bin(data_bin: str | Path, *, documents_per_domain: int | None = None,
                    vocab_size: int = 8000, valid_fraction: float = 0.05,
                    test_fraction: float = 0.05) -> Path:
    """`data_bin` if it holds a data-bin; else preprocess the bundled corpus into it.

    documents_per_domain keeps only the first N documents of each bundled domain (quick runs).
    """
    data_bin = Path(data_bin)
    wanted = dict(vocab_size=vocab_size, valid_fraction=valid_fraction,
                  test_fraction=test_fraction)
    if (data_bin / "meta.json").is_file():
        made = read_meta(data_bin).get("config", {})
        # a bundled data-bin made with other settings (another preset) would be reused silently;
        # a data-bin of the user's own corpus is theirs to size
        if made.get("bundled") or Path(str(made.get("data"))).name == SUBSET_FILE:
            differ = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
            if differ:
                shown = ", ".join(f"{k} {a} (wanted {b})" for k, (a, b) in differ.items())
                raise MoelabError(
                    f"{data_bin} holds the bundled corpus preprocessed with {shown}; use "
                    "another folder (e.g. another --out) or delete that one to rebuild it.")
        return data_bin
    leftovers = list(data_bin.iterdir()) if data_bin.is_dir() else []
    if any(not p.name.startswith(STAGING_PREFIX) for p in leftovers):
        raise MoelabError(f"{data_bin} is not empty and holds no data-bin (no meta.json); point "
                          "the data-bin at an empty or new folder, or at a moelab data-bin.")
    # force: only a killed run's staging folder is there, which preprocess replaces
    config = dict(destdir=str(data_bin), force=bool(leftovers), **wanted)
    if documents_per_domain is None:
        preprocess(PreprocessConfig(bundled=True, **config))
        return data_bin
    with tempfile.TemporaryDirectory(prefix="moelab-corpus-") as tmp:
        subset = Path(tmp) / SUBSET_FILE
        with subset.open("w", encoding="utf-8") as f:
            for doc in bundled_corpus(max_documents=documents_per_domain):
                f.write(json.dumps({"text": doc.text, "domain": doc.domain}) + "\n")
        preprocess(PreprocessConfig(data=str(subset), **config))
    return data_bin


@dataclass
class Workbench:
    """The notebooks' shared state: where data, runs and results live, and how big to train."""

    data_bin: str | Path = "data-bin/mix"
    runs_dir: str | Path = "runs"
    results_dir: str | Path = "results"
    preset: str = "auto"  # gpu | cpu | smoke | auto (gpu when CUDA is available)
    num_experts: int | None = None  # K of every mixture method (dense has 1); None: the preset's
    corpus_documents: int | None = None  # per bundled domain when building data_bin; None: all
    vocab_size: int | None = None  # SentencePiece vocabulary of a new data_bin; None: preset's
    train_options: dict = field(default_factory=dict)  # override preset options, e.g. max_update
    device: str = "auto"  # where models train and evaluate
    _runs: dict = field(default_factory=dict, init=False, repr=False)
    _evals: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_bin, self.runs_dir = Path(self.data_bin), Path(self.runs_dir)
        self.results_dir = Path(self.results_dir)
        self.preset = resolve_preset(self.preset)
        if self.num_experts is None:
            self.num_experts = EXPERT_PRESETS[self.preset]
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    # ------------------------------------------------------------------ training
    def save_dir(self, method: str) -> Path:
        return self.runs_dir / method

    def train_options_for(self, method: str) -> dict:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        options = {**TRAIN_PRESETS[self.preset], **self.train_options, "method": method,
                   "save_dir": str(self.save_dir(method)), "device": self.device}
        if method != "dense":
            options["num_experts"] = self.num_experts
        return options

    def train(self, methods: Sequence[str] | str, *, live=None, retrain: bool = False
              ) -> dict[str, Path]:
        """Train each method whose save dir has no checkpoint yet; -> {method: save dir}.

        `live` (e.g. moelab.report.LiveCurves) receives every log line to plot as it comes.
        """
        methods = [methods] if isinstance(methods, str) else list(methods)
        data_bin = self.ensure_data_bin()
        done = {}
        for method in methods:
            save_dir = self.save_dir(method)
            options = self.train_options_for(method)
            if self.is_trained(method) and not retrain:
                print(f"{method}: using the trained run in {save_dir} (delete it to retrain)")
            else:
                resumable = any((save_dir / name).is_file()
                                for name in (ckpt.LAST, ckpt.previous_path(ckpt.LAST)))
                # retrain, or a run of the workbench's own killed before its first checkpoint:
                # clear its files (the .prev fallback too, or training would resume from it)
                if retrain or not resumable:
                    for name in (ckpt.LAST, ckpt.previous_path(ckpt.LAST), CHECKPOINT,
                                 "train_log.jsonl", DONE_FILE):
                        (save_dir / name).unlink(missing_ok=True)
                else:
                    print(f"{method}: resuming the unfinished run in {save_dir}")
                callbacks = live.callbacks(method) if live is not None else {}
                result = train(str(data_bin), **options, **callbacks)
                (save_dir / DONE_FILE).write_text(json.dumps(
                    {"num_updates": result.num_updates, "options": options}) + "\n")
                self._runs.pop(method, None)
                self._evals = {k: v for k, v in self._evals.items() if k[0] != method}
            done[method] = save_dir
        return done

    def ensure_data_bin(self) -> Path:
        data = {"documents_per_domain": None, **DATA_PRESETS[self.preset]}
        if self.vocab_size is not None:
            data["vocab_size"] = self.vocab_size
        if self.corpus_documents is not None:
            data["documents_per_domain"] = self.corpus_documents
        return ensure_data_bin(self.data_bin, **data)

    def is_trained(self, method: str) -> bool:
        """Finished with the current options (an interrupted or re-sized run is not)."""
        save_dir = self.save_dir(method)
        if not (save_dir / DONE_FILE).is_file() or not (save_dir / CHECKPOINT).is_file():
            return False
        done = json.loads((save_dir / DONE_FILE).read_text())
        # where the run lives and runs does not change what was trained: a moved runs folder,
        # or notebooks opened on another device, still find it trained
        def what(options: dict) -> dict:
            return {k: v for k, v in options.items() if k not in ("device", "save_dir")}
        return what(done.get("options") or {}) == what(
            json.loads(json.dumps(self.train_options_for(method))))

    def run(self, method: str) -> Run:
        """The trained run of `method` (trained first when missing), loaded once."""
        if method not in self._runs:
            if not self.is_trained(method):
                self.train([method])
            self._runs[method] = Run.load(self.save_dir(method), device=self.device)
        return self._runs[method]

    def histories(self, methods: Sequence[str]) -> dict[str, pd.DataFrame]:
        return {m: self.run(m).history for m in methods}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, method: str, split: str = "valid", *, context_window: int = 0
                 ) -> EvalResult:
        """Perplexities, responsibilities and clusters of one method on one split (cached in
        memory here, and on disk by the Run)."""
        key = (method, split, context_window)
        if key not in self._evals:
            self._evals[key] = self.run(method).evaluate(split, context_window=context_window)
        return self._evals[key]

    def method_runs(self, methods: Sequence[str], *, context_window: int = 0) -> list:
        """One moelab.report.MethodRun per method: valid and test evaluation plus the log."""
        from moelab.report import MethodRun

        return [MethodRun(name=m, valid=self.evaluate(m, "valid", context_window=context_window),
                          test=self.evaluate(m, "test", context_window=context_window),
                          history=self.run(m).history) for m in methods]

    # ------------------------------------------------------------------ exports
    def save_figure(self, fig, name: str, formats: Sequence[str] = ("png", "svg", "pdf")
                    ) -> list[Path]:
        from moelab.report import save_figure

        return save_figure(fig, self.results_dir / name, formats)

    def export_table(self, df: pd.DataFrame, name: str,
                     formats: Sequence[str] = ("csv", "md", "tex")) -> list[Path]:
        from moelab.report import export_table

        return export_table(df, self.results_dir / name, formats)

    def sampler(self, method: str, **kwargs):
        """The ipywidgets sampler (moelab.widgets.Sampler) for one trained method."""
        from moelab.widgets import Sampler

        run = self.run(method)
        return Sampler(run.model, run.tokenizer, title=f"{method} (K={run.num_experts})",
                       **kwargs)



def notebook_workbench(parameters: dict[str, object], notebook: str) -> Workbench:
    """The Workbench a notebook's parameters cell describes, in one call (`globals()` works).

    Only the names that are Workbench options are read, so a notebook's own parameters (methods,
    split, prompt, ...) may sit in the same cell. Exports go to `results_dir/<notebook>/`: each
    notebook owns its folder, so none overwrites a figure or table that another exported.
    """
    options = {name: parameters[name] for name, f in Workbench.__dataclass_fields__.items()
               if f.init and name in parameters}
    options["results_dir"] = Path(options.get("results_dir", "results")) / notebook
    wb = Workbench(**options)
    trained = {**TRAIN_PRESETS[wb.preset], **wb.train_options}
    print(f"preset {wb.preset!r} on {wb.device}, K = {wb.num_experts}; data-bin {wb.data_bin}, "
          f"runs in {wb.runs_dir}, exports to {wb.results_dir}\ntraining options: {trained}")
    return wb
