"""Figures of the workbench; each function returns a matplotlib Figure and `save_figure` exports it.

Figures are built with `matplotlib.figure.Figure`, not pyplot: nothing is kept in pyplot's global
figure list, so a loop that makes many figures does not leak them and a notebook shows a figure
once (as the value of its cell, after `%matplotlib inline`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from moelab.eval.lm import EvalResult
from moelab.eval.profiles import ExpertProfiles
from moelab.report.export import output_paths

# One colour per method, the same in every figure.
METHOD_COLORS = {"dense": "#7f7f7f", "hMoEup": "#1f77b4", "hMoElp": "#ff7f0e",
                 "sMoEup": "#2ca02c", "sMoElp": "#d62728"}
ORACLE_LABEL = "oracle (ring): best expert per document,\na bound, not a density"


def method_color(name: str, index: int = 0) -> str:
    if name in METHOD_COLORS:
        return METHOD_COLORS[name]
    extra = colormaps["tab10"].colors[4:]  # after the four the methods use
    return extra[index % len(extra)]


def expert_colors(K: int) -> list:
    cmap = colormaps["tab10" if K <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(K)]


def _expert_label(column: str) -> str:
    return column.removeprefix("expert_")


# ----------------------------------------------------------------------------- export


def save_figure(fig: Figure, path_without_suffix: str | Path,
                formats: Sequence[str] = ("png", "svg", "pdf"), *, dpi: int = 150) -> list[Path]:
    """Write `fig` as path.png, path.svg, path.pdf (folders created); -> the files written."""
    written = []
    for fmt, path in output_paths(path_without_suffix, formats, kind="figure",
                                  allowed=fig.canvas.get_supported_filetypes()):
        # no creation date in svg/pdf: re-exporting an unchanged figure gives the same file
        metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- responsibilities


def _responsibility_frame(result: EvalResult | pd.DataFrame) -> pd.DataFrame:
    return result.responsibilities if isinstance(result, EvalResult) else result


def _draw_heatmap(ax, df: pd.DataFrame, *, show_domains: bool = True):
    values = df.to_numpy(dtype=float)  # (D, K)
    D, K = values.shape
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto")
    size = 9 if K <= 8 else 7 if K <= 14 else 6
    for i in range(D):
        for k in range(K):
            v = values[i, k]
            ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                    color="white" if v > 0.55 else "black")
    ax.set_xticks(range(K), labels=[_expert_label(str(c)) for c in df.columns])
    ax.set_yticks(range(D), labels=[str(d) for d in df.index] if show_domains else [])
    ax.set_xlabel("expert")
    ax.tick_params(length=0)
    return image


def responsibility_heatmap(responsibilities: EvalResult | pd.DataFrame
                           | Mapping[str, EvalResult | pd.DataFrame], *,
                           title: str | None = None, columns: int = 2) -> Figure:
    """Domains x experts: the mean posterior p(expert | document) per domain, written in the cells.

    Pass one EvalResult (or its `responsibilities` DataFrame), or a mapping {method: result} for
    one panel per method side by side. The colour scale is fixed to [0, 1] so that heatmaps of
    different runs compare at a glance.
    """
    if isinstance(responsibilities, Mapping):
        frames = {name: _responsibility_frame(r) for name, r in responsibilities.items()}
    else:
        frames = {"": _responsibility_frame(responsibilities)}
    if not frames:
        raise ValueError("responsibility_heatmap needs at least one result")
    K = max(df.shape[1] for df in frames.values())
    D = max(df.shape[0] for df in frames.values())
    label_width = 0.09 * max(len(str(d)) for df in frames.values() for d in df.index)
    ncols = min(columns, len(frames))
    nrows = math.ceil(len(frames) / ncols)
    panel_w, panel_h = 0.6 + 0.55 * K, 0.6 + 0.4 * D
    fig = Figure(figsize=(1.6 + label_width + ncols * panel_w, 0.7 + nrows * panel_h),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    image = None
    for i, (ax, (name, df)) in enumerate(zip(axes, frames.items(), strict=False)):
        image = _draw_heatmap(ax, df, show_domains=i % ncols == 0)
        if name:
            ax.set_title(name, loc="left", fontsize=10)
    for ax in axes[:: ncols]:
        ax.set_ylabel("domain")
    for ax in axes[len(frames):]:
        ax.set_visible(False)
    colorbar = fig.colorbar(image, ax=axes[: len(frames)].tolist(), fraction=0.05, pad=0.02,
                            aspect=max(10, 12 * nrows))
    colorbar.set_label("mean p(expert | document)")
    fig.suptitle(title or "Responsibilities per domain", x=0.01, ha="left")
    return fig


# ----------------------------------------------------------------------------- expert profiles


def expert_profiles_figure(profiles: ExpertProfiles, *, top_words: int = 8, columns: int = 4,
                           title: str | None = None) -> Figure:
    """One panel per expert: its top words by mean log-ratio log p_z / p_mix (moelab.eval.profiles),
    titled with the documents it wins and the domain holding most of its posterior mass."""
    K = profiles.num_experts
    ncols = min(columns, K)
    nrows = math.ceil(K / ncols)
    fig = Figure(figsize=(3.3 * ncols, 0.6 + nrows * (0.7 + 0.24 * top_words)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colors = expert_colors(K)
    bound = max(0.0, *profiles.words["log_ratio"].tolist()) if len(profiles.words) else 1.0
    for k, ax in enumerate(axes[:K]):
        words = profiles.words[profiles.words["expert"] == k].head(top_words)
        domains = profiles.domains[profiles.domains["expert"] == k]
        main = domains.sort_values(["mass_share", "domain"], ascending=[False, True]).iloc[0]
        ax.set_title(f"expert {k}: {int(domains['won'].sum())} docs won\n"
                     f"{main['domain']} holds {main['mass_share']:.0%} of its mass",
                     loc="left", fontsize=9)
        if words.empty:
            ax.text(0.5, 0.5, f"no word seen {profiles.settings['min_count']}+ times",
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        y = np.arange(len(words))
        ax.barh(y, words["log_ratio"], color=colors[k])
        ax.set_yticks(y, [str(w)[:18] for w in words["word"]], fontsize=8)
        ax.invert_yaxis()  # best word on top
        ax.axvline(0.0, color="#555", linewidth=0.6)
        ax.set_xlim(min(0.0, float(words["log_ratio"].min())) * 1.05, bound * 1.05 or 1.0)
        ax.tick_params(axis="x", labelsize=8)
    for ax in axes[K:]:
        ax.set_visible(False)
    fig.supxlabel("mean log p_z(word | context) - log p_mix(word | context) (nats)", fontsize=9)
    fig.suptitle(title or (f"What each expert predicts better than the mixture "
                           f"({profiles.settings['split']} split)"), x=0.01, ha="left")
    return fig


# ----------------------------------------------------------------------------- perplexity


def _perplexity_table(result: EvalResult | pd.DataFrame) -> pd.DataFrame:
    return result.perplexity if isinstance(result, EvalResult) else result


def _over_seeds(result) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One result, or a list of one per training seed -> (mean table, std table or None)."""
    if isinstance(result, (EvalResult, pd.DataFrame)):
        return _perplexity_table(result), None
    tables = [_perplexity_table(r) for r in result]
    if len(tables) == 1:
        return tables[0], None
    stacked = pd.concat(tables, keys=range(len(tables)))
    return (stacked.groupby(level=1, sort=False).mean().reindex(tables[0].index),
            stacked.groupby(level=1, sort=False).std(ddof=1).reindex(tables[0].index))


def perplexity_by_domain(results: Mapping[str, EvalResult | pd.DataFrame
                                          | Sequence[EvalResult | pd.DataFrame]], *,
                         title: str | None = None, log_scale: bool | None = None) -> Figure:
    """Mixture perplexity of each method, grouped by domain (overall first), as a dot plot.

    A filled dot is the mixture perplexity (the model's density); a ring of the same colour,
    joined to it by a thin line, is the oracle (best single expert per document), a bound and
    labelled as one. Dots rather than bars: perplexities of methods are close and far from zero,
    so the axis starts near the data. It is logarithmic when perplexities span more than a
    factor of 3 (unless log_scale says). A method given a list of results (one per training
    seed) is drawn at its mean with error bars of one standard deviation over the seeds.
    """
    spreads = {name: _over_seeds(r) for name, r in results.items()}
    tables = {name: mean for name, (mean, _) in spreads.items()}
    if not tables:
        raise ValueError("perplexity_by_domain needs at least one method's results")
    groups = list(next(iter(tables.values())).index)
    n = len(tables)
    step = min(0.8 / n, 0.2)
    x = np.arange(len(groups), dtype=float)
    fig = Figure(figsize=(max(6.0, 2.8 + len(groups) * (0.3 + 0.3 * n)), 4.2),
                 layout="constrained")
    ax = fig.add_subplot()
    low, high = math.inf, 0.0
    for i, (name, table) in enumerate(tables.items()):
        table = table.reindex(groups)
        at = x + (i - (n - 1) / 2) * step
        mixture = table["mixture"].to_numpy(float)
        oracle = table["oracle"].to_numpy(float)
        color = method_color(name, i)
        ax.vlines(at, oracle, mixture, colors=color, linewidth=1.2, alpha=0.7, zorder=2)
        ax.plot(at, mixture, linestyle="none", marker="o", markersize=6, color=color, label=name,
                zorder=3)
        std = spreads[name][1]
        if std is not None:  # one standard deviation over the training seeds
            ax.errorbar(at, mixture, yerr=std.reindex(groups)["mixture"].to_numpy(float),
                        fmt="none", ecolor=color, elinewidth=1.2, capsize=3, zorder=3)
            high = max(high, np.nanmax(mixture + std.reindex(groups)["mixture"].to_numpy(float)))
        # a ring, drawn on top: it stays visible when the oracle equals the mixture (dense)
        ax.plot(at, oracle, linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                markeredgecolor=color, markeredgewidth=1.3, zorder=4)
        low = min(low, np.nanmin(oracle))
        high = max(high, np.nanmax(mixture))
    if log_scale is None:
        log_scale = high / max(low, 1e-9) > 3
    if log_scale:
        ax.set_yscale("log")
    pad = (high / low) ** 0.08 if log_scale else None
    if log_scale:
        ax.set_ylim(low / pad, high * pad)
    else:
        margin = max(0.08 * (high - low), 0.02 * high)
        ax.set_ylim(max(0.0, low - margin), high + margin)
    rotate = len(groups) > 5
    ax.set_xticks(x, labels=groups, rotation=30 if rotate else 0,
                  ha="right" if rotate else "center", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    if len(groups) > 1 and groups[0] == "overall":
        ax.axvline(0.5, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_ylabel("perplexity (lower is better)" + (", log scale" if log_scale else ""))
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=11,
                          markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.3))
    labels.append(ORACLE_LABEL)
    ax.legend(handles, labels, title="mixture perplexity (filled)", loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=9, frameon=False,
              alignment="left")
    ax.set_title(title or "Perplexity per method and domain", loc="left")
    return fig


# ----------------------------------------------------------------------------- routing


def routing_curves(curve: pd.DataFrame, *, title: str | None = None) -> Figure:
    """moelab.eval.routing.routing_curve's table against the prefix length M, one line per K':
    routed perplexity (solid) beside the full mixture's on the same tokens (dashed, black),
    routing accuracy (black; dotted: the winner among the K' chosen) and the expert forwards per
    token each costs (dashed, black: full scoring), over every token of the routed documents,
    prefix included, where the perplexities are over the tokens after the prefix."""
    if curve.empty:
        raise ValueError("routing_curves needs at least one (prefix, top_k) row")
    fig = Figure(figsize=(12.5, 3.8), layout="constrained")
    ppl, acc, cost = fig.subplots(1, 3)
    curve = curve.sort_values(["top_k", "prefix"])
    full = curve.drop_duplicates("prefix")  # the full mixture does not depend on K'
    ppl.plot(full["prefix"], full["mixture"], color="black", linestyle="--", marker="o",
             label="full mixture")
    cost.plot(full["prefix"], full["forwards_per_doc_token_full"], color="black", linestyle="--",
              marker="o", label="full scoring")
    # the top-1 choice does not depend on K' either
    acc.plot(full["prefix"], full["accuracy"], color="black", marker="o",
             label="top-1 choice = winner")
    colors = colormaps["tab10"].colors
    for i, (k, part) in enumerate(curve.groupby("top_k", sort=True)):
        color = colors[i % len(colors)]
        ppl.plot(part["prefix"], part["routed"], color=color, marker="o", label=f"routed, K'={k}")
        if k > 1:
            acc.plot(part["prefix"], part["winner_in_chosen"], color=color, marker="s",
                     linestyle=":", label=f"winner among the {k} chosen")
        cost.plot(part["prefix"], part["forwards_per_doc_token_routed"], color=color, marker="o",
                  label=f"routed, K'={k}")
    for ax in (ppl, acc, cost):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(curve["prefix"].unique()),
                      labels=[str(m) for m in sorted(curve["prefix"].unique())])
        ax.set_xlabel("prefix M (tokens read by every expert)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    ppl.set_ylabel("perplexity after the prefix")
    acc.set_ylabel("routing accuracy")
    acc.set_ylim(-0.02, 1.02)
    cost.set_ylabel("expert forwards per document token")
    cost.set_ylim(bottom=0)
    fig.suptitle(title or "Routed inference against the full mixture", x=0.01, ha="left")
    return fig


# ----------------------------------------------------------------------------- training logs


def training_curves(histories: Mapping[str, pd.DataFrame | Sequence[pd.DataFrame]], *,
                    metric: str = "loss", title: str | None = None) -> Figure:
    """Training (left) and validation (right) `metric` per method against updates.

    `histories` maps a method to its `read_history` DataFrame (TrainResult.history), or to a
    list of them, one per training seed: the mean at each update, in a band of one standard
    deviation over the seeds.
    """
    fig = Figure(figsize=(9.5, 3.8), layout="constrained")
    ax_train, ax_valid = fig.subplots(1, 2, sharey=True)
    for i, (name, history) in enumerate(histories.items()):
        color = method_color(name, i)
        seeds = [history] if isinstance(history, pd.DataFrame) else list(history)
        for ax, kind, style in ((ax_train, "train", {}), (ax_valid, "valid", {"marker": "o"})):
            parts = [h[h["kind"] == kind] if "kind" in h else h.iloc[:0] for h in seeds]
            parts = [p[["update", metric]] for p in parts if metric in p and len(p)]
            if not parts:
                continue
            if len(parts) == 1:  # one seed: its log as it is
                ax.plot(parts[0]["update"], parts[0][metric], color=color, label=name,
                        markersize=4, **style)
                continue
            by_update = pd.concat(parts).groupby("update")[metric]
            mean = by_update.mean()
            ax.plot(mean.index, mean.to_numpy(float), color=color, label=name, markersize=4,
                    **style)
            std = by_update.std(ddof=1)  # one standard deviation over the training seeds
            ax.fill_between(mean.index, mean - std, mean + std, color=color, alpha=0.2,
                            linewidth=0)
    unit = " (nats per token)" if metric in ("loss", "nll") else ""
    ax_train.set_ylabel(metric + unit)
    for ax, name in ((ax_train, "training"), (ax_valid, "validation")):
        ax.set_title(name, loc="left")
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    ax_valid.tick_params(labelleft=True)
    for ax in (ax_train, ax_valid):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    hard = any(n.startswith("hMoE") for n in histories)
    soft = any(n.startswith("sMoE") for n in histories)
    if metric == "loss" and hard and soft:
        fig.supxlabel("hard EM (hMoE*) logs -log p(z*, x) for the winning expert z*; soft EM "
                      "(sMoE*) and dense log the marginal -log p(x)", fontsize=8, x=0.01,
                      ha="left")
    handles = [Line2D([], [], color=method_color(n, i), label=n)
               for i, n in enumerate(histories)]
    if handles:
        ax_valid.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                        frameon=False, fontsize=8)
    fig.suptitle(title or f"Training and validation {metric}", x=0.01, ha="left")
    return fig


def compute_curves(histories: Mapping[str, pd.DataFrame | Sequence[pd.DataFrame]], *,
                   title: str | None = None) -> Figure:
    """Validation perplexity per method against cumulative training FLOPs (moelab.train.compute).

    `histories` maps a method to its training log, or to one per training seed: the i-th
    validation of every seed is read together (the workbench's runs validate where their count
    passes the same multiples of one FLOP interval), drawn at the seeds' mean FLOPs with a band
    of one standard deviation in perplexity. Methods whose runs differ in cost per update reach
    the same FLOPs after different numbers of updates: this is the figure that compares them at
    equal compute.
    """
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.subplots()
    for i, (name, history) in enumerate(histories.items()):
        color = method_color(name, i)
        seeds = [history] if isinstance(history, pd.DataFrame) else list(history)
        points = []
        for h in seeds:
            if "kind" not in h or "train_flops" not in h:
                continue
            valid = h[(h["kind"] == "valid") & h["train_flops"].notna()]
            points.append(valid[["train_flops", "ppl"]].reset_index(drop=True))
        if not points:
            continue
        n = min(len(p) for p in points)  # a seed cut short leaves the others' last points out
        flops = np.mean([p["train_flops"].to_numpy(float)[:n] for p in points], axis=0)
        ppl = np.array([p["ppl"].to_numpy(float)[:n] for p in points])  # (seeds, points)
        ax.plot(flops, ppl.mean(0), color=color, label=name, marker="o", markersize=4)
        if len(points) > 1:
            std = ppl.std(0, ddof=1)
            ax.fill_between(flops, ppl.mean(0) - std, ppl.mean(0) + std, color=color,
                            alpha=0.2, linewidth=0)
    ax.set_xlabel("training compute (model FLOPs)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize=8)
    if any(n.startswith("hMoE") for n in histories):
        fig.supxlabel("hard EM (hMoE*) validates -log p(z*, x) of the winning expert; soft EM "
                      "and dense the marginal -log p(x)", fontsize=8, x=0.01, ha="left")
    fig.suptitle(title or "Validation perplexity against training compute", x=0.01, ha="left")
    return fig


def _mass_columns(history: pd.DataFrame) -> list[str]:
    columns = [c for c in history.columns if c.startswith("posterior_mass_")]
    return sorted(columns, key=lambda c: int(c.rsplit("_", 1)[1]))


def expert_usage(histories: Mapping[str, pd.DataFrame] | pd.DataFrame, *, kind: str = "train",
                 title: str | None = None, columns: int | None = None) -> Figure:
    """Mean responsibility of each expert over training, one stacked panel per mixture method.

    Read from the `posterior_mass_k` columns of `read_history`; `kind` picks the train lines (the
    E-step's responsibilities, averaged over each log interval) or the valid lines (posterior
    over whole valid documents). Dense runs (one expert) are left out.
    """
    if isinstance(histories, pd.DataFrame):
        histories = {"": histories}
    panels = {name: h for name, h in histories.items() if len(_mass_columns(h)) > 1}
    if not panels:
        raise ValueError("expert_usage needs a mixture run (K > 1) with posterior_mass_k "
                         "columns in its training log")
    K = max(len(_mass_columns(h)) for h in panels.values())
    colors = expert_colors(K)
    ncols = columns or (2 if len(panels) == 4 else min(3, len(panels)))
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(1.6 + 3.6 * ncols, 0.5 + 2.7 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    for ax, (name, history) in zip(axes, panels.items(), strict=False):
        part = history[history["kind"] == kind] if "kind" in history else history
        mass = _mass_columns(history)
        if len(part):
            ys = part[mass].fillna(0.0).to_numpy(float).T  # (K, steps)
            if len(part) == 1:  # a single line: show it as a bar-like band
                steps = np.asarray(part["update"], float)
                ax.stackplot(np.r_[steps - 0.5, steps + 0.5], np.repeat(ys, 2, axis=1),
                             colors=colors[: len(mass)])
            else:
                ax.stackplot(part["update"].to_numpy(float), ys, colors=colors[: len(mass)])
        ax.set_ylim(0, 1)
        ax.set_title(name, loc="left", fontsize=10)
        ax.set_xlabel("update")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(x=0)
    for ax in axes[:: ncols]:
        ax.set_ylabel("mean responsibility")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Patch(color=colors[k], label=f"expert {k}") for k in range(K)]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=8)
    what = "training batches" if kind == "train" else "validation documents"
    fig.suptitle(title or f"Expert usage over training ({what})", x=0.01, ha="left")
    return fig


# ----------------------------------------------------------------------------- live plot


class LiveCurves:
    """The training loss of each method, redrawn in a notebook as `moelab.train` logs lines.

    `wb.train(methods, live=LiveCurves())`, or `train(..., **live.callbacks("hMoEup"))`. Redraws
    at most every `interval` seconds; validation lines always redraw.
    """

    def __init__(self, metric: str = "loss", interval: float = 2.0):
        self.metric, self.interval = metric, interval
        self.records: dict[str, list[dict]] = {}
        self._handle = None
        self._last = -math.inf

    def callbacks(self, method: str) -> dict:
        return {"on_log": lambda record: self.add(method, record),
                "on_eval": lambda record: self.add(method, record, force=True)}

    def add(self, method: str, record: dict, *, force: bool = False) -> None:
        self.records.setdefault(method, []).append(record)
        if force or time.monotonic() - self._last >= self.interval:
            self.redraw()

    def figure(self) -> Figure:
        histories = {m: pd.DataFrame.from_records(r) for m, r in self.records.items()}
        return training_curves(histories, metric=self.metric,
                               title=f"Training {self.metric} (live)")

    def redraw(self) -> None:
        from IPython.display import display

        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        self._last = time.monotonic()
