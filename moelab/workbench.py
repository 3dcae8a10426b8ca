"""What the notebooks share: one data-bin, a `runs/` folder of trained methods, a results folder.

Every notebook starts from the same parameters and builds a `Workbench`; missing pieces are made
on demand, so each notebook also runs alone:

- the data-bin is preprocessed from the bundled corpus when its folder has no meta.json;
- `wb.run("hMoEup")` trains that method into runs_dir/hMoEup unless a checkpoint is already there
  (notebook 01 trains them all; 02-05 reuse them);
- figures and tables are exported into results_dir.

Several training seeds are one idea here: `Workbench(seeds=[1, 2, 3])` trains and evaluates every
method once per seed. The first seed the options give (the preset's, 1) keeps the single-seed
layout runs_dir/<method>, so existing runs are that seed's; another seed k trains into
runs_dir/seed<k>/<method>. `method_table` then gives each seed's row and their mean and standard
deviation.

Methods are compared two ways. At equal updates, every method trains the preset's max_update
updates (the runs above). At equal compute, every method trains until it has spent the model
FLOPs (moelab.train.compute) that the most expensive compared method spent in its run: that
method's run is its own, and each cheaper method continues its run from there
(runs_dir/at-<that method>/<method>, seeds as above), so dense trains several times as many
updates as a mixture whose E-step scores K experts. Every run validates each time its count
passes a multiple of the same FLOP interval, so their curves against compute can be read
against each other.

Training sizes come from a preset: `gpu` (picked by `auto` when CUDA is available), `cpu` (a few
minutes per method on a laptop) and `smoke` (seconds; for CI).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import pandas as pd
import torch

from moelab.data import PreprocessConfig, bundled_corpus, preprocess, read_meta
from moelab.data.preprocess import STAGING_PREFIX
from moelab.errors import MoelabError
from moelab.eval import EvalResult, evaluate_run
from moelab.presets import STUDIES
from moelab.train import Run, train
from moelab.train import checkpoint as ckpt
from moelab.train.compute import batch_flops
from moelab.train.config import ModelArgs, TrainConfig, model_config
from moelab.train.history import LOG_FILE
from moelab.train.method import METHODS, Method

# The presets' parts, by name (moelab.presets.STUDIES is where they are set).
TRAIN_PRESETS: dict[str, dict] = {name: study.train for name, study in STUDIES.items()}
DATA_PRESETS: dict[str, dict] = {name: study.data for name, study in STUDIES.items()}
EXPERT_PRESETS: dict[str, int] = {name: study.num_experts for name, study in STUDIES.items()}
CHECKPOINT = ckpt.BEST
SUBSET_FILE = "bundled-subset.jsonl"  # the bundled documents a quick preset keeps
DONE_FILE = "done.json"  # written when a run has reached its max_update with these options
# Validation points over the most expensive method's run: every run validates each time its
# train_flops passes a multiple of that run's estimated cost / VALIDATION_POINTS. Each is a
# K-expert pass over the valid split (seconds at the cpu preset), so a few, not many.
VALIDATION_POINTS = 4


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
    seeds: Sequence[int] | None = None  # training seeds of every method; None: the options' one
    _runs: dict = field(default_factory=dict, init=False, repr=False)
    _evals: dict = field(default_factory=dict, init=False, repr=False)
    _classifier: object = field(default=None, init=False, repr=False)
    _profiles: dict = field(default_factory=dict, init=False, repr=False)
    _interval: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data_bin, self.runs_dir = Path(self.data_bin), Path(self.runs_dir)
        self.results_dir = Path(self.results_dir)
        self.preset = resolve_preset(self.preset)
        if self.num_experts is None:
            self.num_experts = EXPERT_PRESETS[self.preset]
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.seeds = [self.home_seed] if self.seeds is None else [int(s) for s in self.seeds]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds {self.seeds}: give one or more distinct seeds >= 0")

    @property
    def home_seed(self) -> int:
        """The seed the preset and train_options give (TrainConfig's 1 unless set): its runs keep
        the single-seed layout runs_dir/<method>."""
        return int({**TRAIN_PRESETS[self.preset], **self.train_options}.get(
            "seed", TrainConfig.seed))

    # ------------------------------------------------------------------ training
    def _seed(self, seed: int | None) -> int:
        return self.seeds[0] if seed is None else int(seed)

    def save_dir(self, method: str, seed: int | None = None, at: str | None = None) -> Path:
        """runs_dir/<method> for the home seed (the single-seed layout), else
        runs_dir/seed<k>/<method>; seed None: the workbench's first seed. `at` (a method
        name): the run trained to the compute `at` spent, runs_dir/[seed<k>/]at-<at>/<method>
        (`at`'s own run when method is `at`)."""
        seed = self._seed(seed)
        home = self.runs_dir if seed == self.home_seed else self.runs_dir / f"seed{seed}"
        if at is None or at == method:
            return home / method
        return home / f"at-{at}" / method

    def variant(self, name: str, **train_options) -> Workbench:
        """This workbench with `train_options` added to its own, its runs in runs_dir/<name>/:
        the same methods trained another way (e.g. a remedy against collapse, balance=
        "sinkhorn") beside the plain runs, which stay where they are. Data-bin, preset, K,
        seeds and the export folder are this workbench's."""
        if name in METHODS or name.startswith(("seed", "at-")) or not name or "/" in name:
            raise ValueError(f"variant name {name!r} would share a folder with this "
                             "workbench's runs (a method, seed<k> or at-<method>); pick another")
        return replace(self, runs_dir=self.runs_dir / name,
                       train_options={**self.train_options, **train_options})

    def train_options_for(self, method: str, seed: int | None = None,
                          at: str | None = None) -> dict:
        """The options `method` trains with; `at`: continued until it has spent the FLOPs of
        `at`'s run (whose run must exist: see `budget`)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        preset = {**TRAIN_PRESETS[self.preset], **self.train_options}
        options = {**preset, "method": method,
                   "save_dir": str(self.save_dir(method, seed, at)), "device": self.device}
        if "validate_interval_flops" not in preset and "max_update" in preset:
            options["validate_interval_flops"] = self.validation_interval()
        if method != "dense":
            options["num_experts"] = self.num_experts
        if self._seed(seed) != self.home_seed:  # the home seed's options stay as they were
            options["seed"] = self._seed(seed)
        if at is not None and at != method:
            options.update(max_update=0, max_flops=self.flops_spent(at, seed))
        return options

    def validation_interval(self) -> float:
        """The FLOP interval at which every run validates: the most expensive method's run at
        this preset (full batches of max_tokens, all K experts scored and, for soft EM with a
        learned prior, trained) over VALIDATION_POINTS. Rounded to 3 digits, so the options
        read well; the same for every method, so their validations fall at the same compute.
        Computed once: every run's options (and so every `is_trained`) ask for it."""
        if self._interval is not None:
            return self._interval
        options = {**TRAIN_PRESETS[self.preset], **self.train_options}
        meta = read_meta(self.ensure_data_bin())
        T = int(options.get("tokens_per_sample", 1024))
        rows = max(1, int(options.get("max_tokens") or T) // T)
        args = {k: v for k, v in options.items() if k in ModelArgs.__dataclass_fields__}
        costs = []
        for method in METHODS:
            margs = ModelArgs(**{**args, "method": method,
                                 "num_experts": None if method == "dense" else self.num_experts})
            config = model_config(margs, vocab_size=int(meta["vocab_size"]), pad_id=0,
                                  tokens_per_sample=T)
            costs.append(batch_flops(config, [T] * rows, T,
                                     method=Method.parse(method)).total)
        interval = max(costs) * int(options["max_update"]) * int(
            options.get("update_freq", 1)) / VALIDATION_POINTS
        self._interval = float(f"{interval:.3g}")
        return self._interval

    def flops_spent(self, method: str, seed: int | None = None) -> float:
        """The model FLOPs `method`'s run (at equal updates) spent, from its training log."""
        log = self.save_dir(method, seed) / LOG_FILE
        if not self.is_trained(method, seed) or not log.is_file():
            raise MoelabError(f"{method} (seed {self._seed(seed)}) has no finished run in "
                              f"{self.save_dir(method, seed)}: train it first "
                              "(Workbench.train, or budget(), which trains what is missing)")
        last = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])
        return float(last["train_flops"])

    def budget(self, methods: Sequence[str], seed: int | None = None) -> str:
        """The method whose run (at equal updates) spent the most FLOPs, training what is
        missing: the compute every method is compared at, `at=` of the equal-compute runs."""
        seed = self._seed(seed)
        missing = [m for m in methods if not self.is_trained(m, seed)]
        if missing:
            self.train(missing, seeds=[seed])
        return max(methods, key=lambda m: self.flops_spent(m, seed))

    def train(self, methods: Sequence[str] | str, *, live=None, retrain: bool = False,
              seeds: Sequence[int] | None = None, at: str | None = None
              ) -> dict[str, Path]:
        """Train each method, for each seed (default: the workbench's), whose save dir has no
        finished run yet; -> {method: save dir of the first seed}.

        `at` (a method name, or "flops" for `budget(methods)`): train each method on until it
        has spent what `at`'s run spent (the equal-compute comparison); the runs at equal
        updates are trained first where missing. `live` (e.g. moelab.report.LiveCurves)
        receives every log line to plot as it comes.
        """
        methods = [methods] if isinstance(methods, str) else list(methods)
        data_bin = self.ensure_data_bin()
        seeds = self.seeds if seeds is None else [int(s) for s in seeds]
        for seed in seeds:
            target = self.budget(methods, seed) if at == "flops" else at
            if target is not None:
                self.train([target], seeds=[seed], retrain=retrain, live=live)
            for method in methods:
                self._train_one(data_bin, method, seed, live=live, retrain=retrain, at=target)
        first = self.budget(methods, seeds[0]) if at == "flops" else at
        return {method: self.save_dir(method, seeds[0], first) for method in methods}

    def _train_one(self, data_bin: Path, method: str, seed: int, *, live, retrain: bool,
                   at: str | None = None) -> None:
        save_dir = self.save_dir(method, seed, at)
        if at is not None and at != method:
            self._train_one(data_bin, method, seed, live=live, retrain=retrain)
        options = self.train_options_for(method, seed, at)
        if self.is_trained(method, seed, at) and not retrain:
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
                if at is not None and at != method:  # continue the run at equal updates
                    _branch_run(self.save_dir(method, seed), save_dir)
            else:
                print(f"{method}: resuming the unfinished run in {save_dir}")
            callbacks = live.callbacks(method) if live is not None else {}
            result = train(str(data_bin), **options, **callbacks)
            # the thread count is part of what makes a CPU run repeat bit for bit
            (save_dir / DONE_FILE).write_text(json.dumps(
                {"num_updates": result.num_updates, "options": options,
                 "threads": torch.get_num_threads()}) + "\n")
            key = (method, seed, at if at != method else None)
            self._runs.pop(key, None)
            self._evals = {k: v for k, v in self._evals.items() if k[:3] != key}
            self._profiles = {k: v for k, v in self._profiles.items()
                              if k[:2] != (method, seed)}

    def ensure_data_bin(self) -> Path:
        data = {"documents_per_domain": None, **DATA_PRESETS[self.preset]}
        if self.vocab_size is not None:
            data["vocab_size"] = self.vocab_size
        if self.corpus_documents is not None:
            data["documents_per_domain"] = self.corpus_documents
        return ensure_data_bin(self.data_bin, **data)

    def is_trained(self, method: str, seed: int | None = None, at: str | None = None) -> bool:
        """Finished with the current options (an interrupted or re-sized run is not)."""
        save_dir = self.save_dir(method, seed, at)
        if not (save_dir / DONE_FILE).is_file() or not (save_dir / CHECKPOINT).is_file():
            return False
        if at is not None and at != method and not self.is_trained(at, seed):
            return False
        done = json.loads((save_dir / DONE_FILE).read_text())
        # where the run lives and runs does not change what was trained: a moved runs folder,
        # or notebooks opened on another device, still find it trained
        def what(options: dict) -> dict:
            return {k: v for k, v in options.items() if k not in ("device", "save_dir")}
        return what(done.get("options") or {}) == what(
            json.loads(json.dumps(self.train_options_for(method, seed, at))))

    def training_threads(self, method: str, seed: int | None = None,
                         at: str | None = None) -> int | None:
        """The torch thread count the run trained with (None: trained before it was kept)."""
        done = self.save_dir(method, seed, at) / DONE_FILE
        return json.loads(done.read_text()).get("threads") if done.is_file() else None

    def threads_trained_with(self, methods: Sequence[str], at: str | None = None) -> list[str]:
        """The torch thread counts the methods' runs of every seed trained with ("None": not
        recorded), sorted; at="flops": their runs at equal compute (and the ones before)."""
        seen = set()
        for seed in self.seeds:
            target = self.budget(methods, seed) if at == "flops" else at
            for m in methods:
                seen.add(str(self.training_threads(m, seed)))
                if target is not None:
                    seen.add(str(self.training_threads(m, seed, target)))
        return sorted(seen)

    def run(self, method: str, seed: int | None = None, at: str | None = None) -> Run:
        """The trained run of `method` (trained first when missing), loaded once; `at`: its run
        at the compute `at` spent."""
        seed = self._seed(seed)
        key = (method, seed, at if at != method else None)
        if key not in self._runs:
            if not self.is_trained(method, seed, at):
                self.train([method], seeds=[seed], at=at)
            # the workbench's data-bin, not the path the checkpoint recorded: a relative one
            # is wrong from another working folder, and a moved runs folder is still trained
            self._runs[key] = Run.load(self.save_dir(method, seed, at), device=self.device,
                                       data_bin=self.data_bin)
        return self._runs[key]

    def histories(self, methods: Sequence[str]) -> dict[str, pd.DataFrame]:
        return {m: self.run(m).history for m in methods}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, method: str, split: str = "valid", *, context_window: int = 0,
                 seed: int | None = None, at: str | None = None) -> EvalResult:
        """Perplexities, responsibilities and clusters of one method on one split (cached in
        memory here, and on disk by the Run)."""
        seed = self._seed(seed)
        key = (method, seed, at if at != method else None, split, context_window)
        if key not in self._evals:
            self._evals[key] = evaluate_run(self.run(method, seed, at),
                split, context_window=context_window)
        return self._evals[key]

    def method_runs(self, methods: Sequence[str], *, context_window: int = 0,
                    seed: int | None = None, at: str | None = None) -> list:
        """One moelab.report.MethodRun per method: valid and test evaluation plus the log.
        at="flops": every method at the compute of the most expensive one (`budget`)."""
        from moelab.report import MethodRun

        target = self.budget(methods, seed) if at == "flops" else at
        return [MethodRun(name=m, valid=self.evaluate(m, "valid", context_window=context_window,
                                                      seed=seed, at=target),
                          test=self.evaluate(m, "test", context_window=context_window,
                                             seed=seed, at=target),
                          history=self.run(m, seed, target).history) for m in methods]

    def method_table(self, methods: Sequence[str], *, context_window: int = 0,
                     at: str | None = None) -> pd.DataFrame:
        """moelab.report.method_table of every seed: with one seed, that table; with several,
        each seed's rows then each method's mean and standard deviation (moelab.report.
        over_seeds). at="flops": at equal compute (each seed's most expensive method's). Its
        notes say which, and the torch threads the runs trained and evaluate with."""
        from moelab import report

        tables = {seed: report.method_table(self.method_runs(methods, seed=seed, at=at,
                                                             context_window=context_window))
                  for seed in self.seeds}
        table = tables[self.seeds[0]] if len(tables) == 1 else report.over_seeds(tables)
        trained = self.threads_trained_with(methods, at=at)
        if at == "flops":
            owners = sorted({self.budget(methods, seed) for seed in self.seeds})
            compared = (f"At equal training compute: every method trained until it had spent "
                        f"the model FLOPs of {' / '.join(owners)}'s run (the most expensive).")
        else:
            compared = "At equal updates: every method trained the same number of updates."
        table.attrs["threads"] = torch.get_num_threads()
        table.attrs["notes"] = [compared, *table.attrs.get("notes", []),
                                f"torch threads: {'/'.join(trained)} in training (None: not "
                                f"recorded), {torch.get_num_threads()} in evaluation."]
        return table

    def expert_profiles(self, method: str, split: str = "valid", *, seed: int | None = None,
                        min_count: int = 5, top_words: int = 10, top_documents: int = 3):
        """What each expert of `method` has learnt on `split`: its top words by log-ratio to
        the mixture, its documents of highest posterior, the domains it takes
        (moelab.eval.profiles.ExpertProfiles; computed once per setting, kept in memory)."""
        from moelab.eval.profiles import expert_profiles

        key = (method, self._seed(seed), split, min_count, top_words, top_documents)
        if key not in self._profiles:
            run = self.run(method, seed)
            self._profiles[key] = expert_profiles(
                run.model, run.dataset(split), run.tokenizer, min_count=min_count,
                top_words=top_words, top_documents=top_documents, progress=True)
        return self._profiles[key]

    # ------------------------------------------------------------------ samples
    def domain_classifier(self):
        """moelab.eval.attribution's tf-idf classifier of the data-bin's domains (fit once)."""
        from moelab.eval.attribution import fit_domain_classifier

        if self._classifier is None:
            self._classifier = fit_domain_classifier(self.ensure_data_bin())
        return self._classifier

    def expert_samples(self, method: str, *, per_expert: int = 3, max_new_tokens: int = 48,
                       sampling_seed: int = 1, seed: int | None = None) -> dict[int, list[str]]:
        """expert -> `per_expert` continuations of the empty prompt
        (moelab.generate.expert_samples)."""
        from moelab.generate import expert_samples

        run = self.run(method, seed)
        return expert_samples(run.model, run.tokenizer, per_expert=per_expert,
                              max_new_tokens=max_new_tokens, seed=sampling_seed)

    def attribution(self, method: str, *, seed: int | None = None,
                    samples: dict[int, list[str]] | None = None, **sampling) -> pd.DataFrame:
        """Per expert: the domain it owns on valid (none when unused), the domain its samples read
        as, and whether they match (moelab.eval.attribution.attribute_samples); `sampling` goes to
        expert_samples."""
        from moelab.eval.attribution import attribute_samples

        if samples is None:
            samples = self.expert_samples(method, seed=seed, **sampling)
        valid = self.evaluate(method, "valid", seed=seed)
        return attribute_samples(self.domain_classifier(), samples, valid.responsibilities,
                                 usage=valid.usage)

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



def notebook_defaults() -> dict[str, object]:
    """The parameters every notebook shares, at their defaults: the Workbench's options
    (data_bin, runs_dir, results_dir, preset, num_experts, corpus_documents, vocab_size,
    train_options, device, seeds). A notebook's parameters cell assigns only those it changes;
    set one there (or inject it, papermill-style) and `notebook_workbench` reads it."""
    return {f.name: f.default_factory() if callable(f.default_factory) else f.default
            for f in fields(Workbench) if f.init}


def notebook_workbench(parameters: dict[str, object], notebook: str) -> Workbench:
    """The Workbench a notebook's parameters cell describes, in one call (`globals()` works).

    Only the names that are Workbench options are read, so a notebook's own parameters (methods,
    split, prompt, ...) may sit in the same cell; the shared ones it does not set keep
    `notebook_defaults()`. Exports go to `results_dir/<notebook>/`: each notebook owns its
    folder, so none overwrites a figure or table that another exported.
    """
    options = {name: parameters.get(name, default)
               for name, default in notebook_defaults().items()}
    options["results_dir"] = Path(options["results_dir"]) / notebook
    wb = Workbench(**options)
    trained = {**TRAIN_PRESETS[wb.preset], **wb.train_options}
    print(f"preset {wb.preset!r} on {wb.device}, K = {wb.num_experts}; data-bin {wb.data_bin}, "
          f"runs in {wb.runs_dir}, exports to {wb.results_dir}\ntraining options: {trained}")
    return wb


def _branch_run(source: Path, save_dir: Path) -> None:
    """Start `save_dir` as a copy of the finished run in `source`, for training on from there:
    its checkpoints hard-linked where the filesystem allows (a save replaces a file, never
    writes into it), its log copied (a log line is appended in place)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    for name in (ckpt.LAST, CHECKPOINT):
        target = save_dir / name
        target.unlink(missing_ok=True)
        try:
            os.link(source / name, target)
        except OSError:
            shutil.copy2(source / name, target)
    shutil.copy2(source / LOG_FILE, save_dir / LOG_FILE)
