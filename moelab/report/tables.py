"""Tables of the workbench as DataFrames, exported to CSV, Markdown and LaTeX.

Markdown and LaTeX are written here (a few lines each) rather than by pandas, whose
`to_markdown` needs `tabulate` and whose `to_latex` needs `jinja2`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moelab.clustering import FLAT_EXPERT_SPREAD, FLAT_MAX_POSTERIOR
from moelab.eval.lm import ORACLE_NOTE, EvalResult
from moelab.eval.profiles import ExpertProfiles
from moelab.report.export import output_paths
from moelab.train import Run, TrainResult, read_history


@dataclass
class MethodRun:
    """One method's results: its evaluations and (optionally) its training log.

    `history` is a `read_history` DataFrame; `MethodRun.of(name, train_result_or_save_dir, ...)`
    reads it for you. Training speed and time come from the log.
    """

    name: str
    valid: EvalResult
    test: EvalResult | None = None
    history: pd.DataFrame | None = None

    @classmethod
    def of(cls, name: str, run: Run | TrainResult | str | Path | None, valid: EvalResult,
           test: EvalResult | None = None) -> MethodRun:
        """`run` is a Run, a TrainResult or a save folder (its log is read), or None."""
        if isinstance(run, TrainResult):
            run = run.run
        if isinstance(run, Run):
            history = run.history
        elif run is not None:
            history = read_history(run)
        else:
            history = None
        return cls(name=name, valid=valid, test=test, history=history)


CONFIDENCE_COLUMNS = {"mean_max_posterior": "mean max posterior",
                      "mean_posterior_entropy": "posterior entropy",
                      "expert_spread": "expert spread"}
CONFIDENCE_NOTE = (
    "Confidence of each clustering: mean max posterior = mean over documents of max_z p(z | doc) "
    "(1/K: flat, 1: sure); posterior entropy = mean entropy of p(z | doc) in nats (log K: flat); "
    "expert spread = per document the standard deviation over experts of log p(doc | z) per "
    "token, averaged (nats/token; 0: the experts are the same model). With mean max posterior < "
    f"{FLAT_MAX_POSTERIOR} or expert spread < {FLAT_EXPERT_SPREAD} the posterior is flat and "
    "its purity/NMI/ARI are not a clean split, however high.")


def _confidence(result: EvalResult) -> dict[str, float]:
    return {column: float(result.clusters.get(key, math.nan))
            for key, column in CONFIDENCE_COLUMNS.items()}


def _training_cost(history: pd.DataFrame | None) -> dict[str, float]:
    """What a run cost, from its training log: updates, model FLOPs (moelab.train.compute) and
    seconds spent training (validation excluded), and its mean tokens/s. NaN where the log does
    not say (a log written before moelab counted compute has no FLOPs; its time is the run's
    wall time, validation included)."""
    cost = {"updates": math.nan, "train FLOPs": math.nan, "train time (s)": math.nan,
            "tokens/s": math.nan}
    if history is None or "kind" not in history or not len(history):
        return cost
    train = history[history["kind"] == "train"]
    if "tokens_per_s" in train and len(train):
        cost["tokens/s"] = float(train["tokens_per_s"].mean())
    if "update" in history:
        cost["updates"] = float(history["update"].max())
    if "train_flops" in history and history["train_flops"].notna().any():
        cost["train FLOPs"] = float(history["train_flops"].max())
    seconds = "train_seconds" if "train_seconds" in history else "wall"
    if seconds in history:
        cost["train time (s)"] = float(history[seconds].max())
    return cost


def method_table(runs: Sequence[MethodRun]) -> pd.DataFrame:
    """One row per method: perplexities, cost, usage, cluster agreement, speed.

    Columns: mixture and oracle perplexity on valid and test; what training cost (updates,
    model FLOPs, seconds spent training, validation excluded); the mixture perplexity of each
    domain, usage (experts used of K, usage entropy) and cluster agreement (NMI, ARI) with its
    confidence (mean max posterior, posterior entropy, expert spread) on the test split (valid
    when a run has no test evaluation); training tokens/s and time. The oracle is a bound, not a
    density: `df.attrs["notes"]` says so and the exports print it under the table.
    """
    rows = {}
    domain_split = {}
    for run in runs:
        row: dict = {}
        for split, result in (("valid", run.valid), ("test", run.test)):
            overall = result.perplexity.loc["overall"] if result is not None else None
            row[f"{split} ppl"] = math.nan if overall is None else float(overall["mixture"])
            row[f"{split} oracle ppl"] = math.nan if overall is None else float(overall["oracle"])
        cost = _training_cost(run.history)
        row.update({k: v for k, v in cost.items() if k != "tokens/s"})
        main, split = (run.test, "test") if run.test is not None else (run.valid, "valid")
        domain_split[run.name] = split
        for domain, values in main.perplexity.drop(index="overall").iterrows():
            row[f"{domain} ppl"] = float(values["mixture"])
        s = main.summary
        row["experts used"] = int(s["experts_used"])
        row["K"] = int(s["num_experts"])
        row["usage entropy"] = float(s["usage_entropy"])
        row["NMI"] = float(main.clusters["nmi"])
        row["ARI"] = float(main.clusters["ari"])
        row.update(_confidence(main))
        row["tokens/s"] = cost["tokens/s"]
        rows[run.name] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "method"
    splits = sorted(set(domain_split.values()))
    df.attrs["notes"] = [
        "ppl: mixture perplexity, the model's density. " + ORACLE_NOTE + ".",
        f"Per-domain perplexity, experts used (winning >= 1/(4K) of documents), usage entropy "
        f"(nats) and NMI/ARI (argmax posterior vs domain) on the {' / '.join(splits)} split.",
        CONFIDENCE_NOTE,
        "updates, train FLOPs (model FLOPs, moelab.train.compute) and train time (seconds "
        "spent training, validation excluded): what each run cost; tokens/s: training "
        "throughput (mean over log intervals).",
    ]
    return df


def cluster_table(results: Mapping[str, EvalResult]) -> pd.DataFrame:
    """One row per method: how experts split the documents and how that matches the domains.

    Columns: K, experts used, usage entropy (nats), purity, NMI, ARI, the clustering's
    confidence (mean max posterior, posterior entropy, expert spread), then the share of documents
    each expert wins (`expert k`; empty where a method has fewer experts).
    """
    rows = {}
    for name, result in results.items():
        s, c = result.summary, result.clusters
        row = {"K": int(s["num_experts"]), "experts used": int(s["experts_used"]),
               "usage entropy": float(s["usage_entropy"]), "purity": float(c["purity"]),
               "NMI": float(c["nmi"]), "ARI": float(c["ari"]), **_confidence(result)}
        for expert, share in result.usage["share"].items():
            row[str(expert).replace("_", " ")] = float(share)
        rows[name] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "method"
    df.attrs["notes"] = [
        "expert k: share of documents whose posterior p(expert | document) peaks at expert k. "
        "Experts used: experts winning >= 1/(4K) of documents. Purity, NMI and ARI compare the "
        "argmax posterior with the domain labels.", CONFIDENCE_NOTE]
    return df


# ----------------------------------------------------------------------------- seeds

SEED_MEAN, SEED_STD = "mean", "std"  # the "seed" of the summary rows of over_seeds


def over_seeds(tables: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """One table per training seed (same rows and columns) -> each seed's rows, then per row name
    the mean and the standard deviation (ddof 1; NaN with one seed) over seeds.

    The result keeps the index (method) and puts a `seed` column first: seed k's rows carry k,
    the summary rows "mean" and "std". Non-numeric columns take the first seed's value in the
    summary rows. `export_table` writes it whole to CSV and as mean ± std to Markdown and LaTeX.
    """
    if not tables:
        raise ValueError("over_seeds needs the table of at least one seed")
    first = next(iter(tables.values()))
    per_seed = pd.concat([t.assign(seed=seed) for seed, t in tables.items()])
    numeric = [c for c in first.columns if pd.api.types.is_numeric_dtype(first[c])]
    grouped = per_seed.groupby(level=0, sort=False)[numeric]
    summary = []
    for name, values in ((SEED_MEAN, grouped.mean()), (SEED_STD, grouped.std(ddof=1))):
        rows = first.copy()
        rows[numeric] = values.reindex(first.index)
        summary.append(rows.assign(seed=name))
    long = pd.concat([per_seed, *summary])
    long["seed"] = long["seed"].astype(object)
    long = long[["seed", *first.columns]]
    long.index.name = first.index.name
    long.attrs = {**first.attrs, "seeds": list(tables),
                  "notes": [*first.attrs.get("notes", []),
                            f"Over training seeds {', '.join(map(str, tables))}: mean ± "
                            "standard deviation (ddof 1); each seed's row is in the CSV."]}
    return long


def mean_std(long: pd.DataFrame) -> pd.DataFrame:
    """An over_seeds table as a reader wants it: one row per method, `mean ± std` cells."""
    mean = long[long["seed"] == SEED_MEAN].drop(columns="seed")
    std = long[long["seed"] == SEED_STD].drop(columns="seed")
    shown = pd.DataFrame(index=mean.index)
    per_seed = long[~long["seed"].isin([SEED_MEAN, SEED_STD])]
    shown.insert(0, "seeds", per_seed.groupby(level=0, sort=False).size().reindex(mean.index))
    for column in mean.columns:
        if not pd.api.types.is_numeric_dtype(mean[column]):
            shown[column] = mean[column]
            continue
        decimals = _column_decimals(mean[column].astype(float))
        shown[column] = [f"{format_value(m, decimals)} ± {format_value(d, decimals)}"
                         for m, d in zip(mean[column], std[column], strict=True)]
    shown.attrs = dict(long.attrs)
    return shown


# ----------------------------------------------------------------------------- formatting


def format_value(value, decimals: int | None = None) -> str:
    """A number as a reader wants it: thousands separated, `decimals` places (default: by size)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if decimals is None:
            decimals = _decimals(abs(v))
        text = f"{v:,.{decimals}f}"
        return text[1:] if text.startswith("-") and float(text[1:].replace(",", "")) == 0 else (
            text)  # no "-0.000"
    return str(value)


def _decimals(magnitude: float) -> int:
    return 3 if magnitude < 10 else 2 if magnitude < 1000 else 0


def _column_decimals(column: pd.Series) -> int | None:
    """One number of decimals per column (by its largest value), so digits line up."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(float)
    values = values[np.isfinite(values)]
    if not pd.api.types.is_float_dtype(column) or not len(values):
        return None
    return _decimals(float(np.abs(values).max()))


def _cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, formatted rows and which columns are numeric (right-aligned); index first."""
    header = [str(df.index.name or "")] + [str(c) for c in df.columns]
    numeric = [False] + [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    decimals = [_column_decimals(df[c]) for c in df.columns]
    rows = [[str(index)] + [format_value(v, d) for v, d in zip(values, decimals, strict=True)]
            for index, values in zip(df.index, df.itertuples(index=False), strict=True)]
    return header, rows, numeric


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned), then the table's notes."""
    header, rows, numeric = _cells(df)

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    widths = [max(len(escape(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths = [max(w, 3) for w in widths]

    def line(cells: list[str]) -> str:
        parts = [escape(c).rjust(w) if num else escape(c).ljust(w)
                 for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if num else "-" * w
                             for w, num in zip(widths, numeric, strict=True)) + " |"
    out = [line(header), rule, *(line(r) for r in rows)]
    notes = df.attrs.get("notes", [])
    if notes:
        out += ["", *(f"- {note}" for note in notes)]
    return "\n".join(out) + "\n"


def expert_profiles_markdown(profiles: ExpertProfiles, *, method: str, top_words: int = 6,
                             heading: str = "##", figure: str | None = None) -> str:
    """A report section: each expert's documents won, main domain, top words and surest
    document (ExpertProfiles.table), with a line saying how they are measured; `figure` is the
    path of moelab.report.expert_profiles_figure's image to show under it."""
    s = profiles.settings
    lines = [
        f"{heading} What each expert has learnt ({method}, {s['split']} split)", "",
        "Per expert: the documents it wins, the domain that holds most of its posterior mass, "
        "the words it predicts best against the mixture (the mean over a word's occurrences of "
        "log p_z(word | context) - log p_mix(word | context), p_mix weighted by the prior at "
        f"the document start; words seen at least {s['min_count']} times) and its document of "
        "highest posterior.", "",
        to_markdown(profiles.table(top_words=top_words)),
    ]
    if figure:
        lines += [f"![Top words of each expert ({method})]({figure})", ""]
    return "\n".join(lines)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame, *, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs `table` environment (needs \\usepackage{booktabs}); notes go in the caption."""
    header, rows, numeric = _cells(df)
    spec = "".join("r" if num else "l" for num in numeric)
    notes = " ".join(df.attrs.get("notes", []))
    caption_text = " ".join(t for t in (caption, notes) if t)
    out = ["\\begin{table}[ht]", "\\centering", "\\small", f"\\begin{{tabular}}{{{spec}}}",
           "\\toprule", " & ".join(latex_escape(h) for h in header) + " \\\\", "\\midrule"]
    out += [" & ".join(latex_escape(c) for c in r) + " \\\\" for r in rows]
    out += ["\\bottomrule", "\\end{tabular}"]
    if caption_text:
        out.append(f"\\caption{{{latex_escape(caption_text)}}}")
    if label:
        out.append(f"\\label{{{label}}}")
    out.append("\\end{table}")
    return "\n".join(out) + "\n"


def export_table(df: pd.DataFrame, path_stem: str | Path,
                 formats: Sequence[str] = ("csv", "md", "tex"), *,
                 caption: str | None = None) -> list[Path]:
    """Write path_stem.csv (full precision), .md and .tex (rounded for reading); -> files.

    An over_seeds table goes whole (each seed, mean, std) to CSV and as mean ± std to .md/.tex.
    """
    shown = mean_std(df) if "seeds" in df.attrs else df
    written = []
    for fmt, path in output_paths(path_stem, formats, allowed=("csv", "md", "tex"),
                                  kind="table"):
        if fmt == "csv":
            df.to_csv(path)
        elif fmt == "md":
            path.write_text(to_markdown(shown), encoding="utf-8")
        else:
            path.write_text(to_latex(shown, caption=caption), encoding="utf-8")
        written.append(path)
    return written
