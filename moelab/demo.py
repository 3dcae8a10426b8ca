"""`moelab demo`: the whole study on the bundled corpus in one command.

Preprocess the bundled corpus, train the dense baseline and the four EM methods with a preset
sized to the machine, then train each on until it has spent the compute of the most expensive
one (the comparison at equal training FLOPs, which the report gives first; moelab.workbench),
evaluate them on valid and test, sample from every expert, and write a report folder. It is
the notebooks' Workbench run end to end: every stage is cached in the output folder, so
running the demo again skips finished work and resumes unfinished training from its last
checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from moelab import __version__
from moelab.clustering import flat_reasons
from moelab.errors import MoelabError
from moelab.train.method import METHODS
from moelab.workbench import TRAIN_PRESETS, Workbench

SAMPLE_TOKENS = {"gpu": 96, "cpu": 48, "smoke": 8}


@dataclass
class DemoConfig:
    out: str = "moelab-demo"  # the report folder (also holds the data-bin and the runs)
    preset: str = "auto"  # cpu | gpu | smoke | auto (gpu when CUDA is available)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    num_experts: int | None = None  # K of the mixture methods (default: the preset's)
    seed: int = 1  # sampling seed
    seeds: list[int] = field(default_factory=lambda: [1])  # training seeds of every method
    attribution_samples: int = 3  # samples per expert the domain classifier reads; 0: none

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise MoelabError(f"--methods {','.join(self.methods)}: choose from "
                              f"{', '.join(METHODS)} (comma-separated)")
        if self.num_experts is not None and self.num_experts < 2:
            raise MoelabError(f"--num-experts must be >= 2 for the mixture methods, got "
                              f"{self.num_experts} (dense is always K = 1)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise MoelabError(f"--seeds {','.join(map(str, self.seeds))}: give a number of seeds "
                              "(3 means 1,2,3) or distinct seeds >= 0, comma-separated")
        if self.attribution_samples < 0:
            raise MoelabError(f"--attribution-samples must be >= 0, got "
                              f"{self.attribution_samples}")


def _say(message: str) -> None:
    print(f"moelab demo: {message}", file=sys.stderr, flush=True)


def demo(config: DemoConfig) -> Path:
    """Run the study; returns the path of report.md."""
    out = Path(config.out)
    try:
        wb = Workbench(data_bin=out / "data-bin", runs_dir=out / "runs", results_dir=out,
                       preset=config.preset, num_experts=config.num_experts, seeds=config.seeds)
    except ValueError as e:
        raise MoelabError(str(e)) from None
    started = time.perf_counter()
    _say(f"preset {wb.preset} on {wb.device}: {', '.join(config.methods)}; "
         f"K = {wb.num_experts}; training seeds {', '.join(map(str, wb.seeds))}; "
         f"{torch.get_num_threads()} torch threads; output in {out}")
    wb.ensure_data_bin()
    for seed in wb.seeds:
        for method in config.methods:
            wb.train([method], seeds=[seed])
        owner = wb.budget(config.methods, seed)
        _say(f"seed {seed}: training every method on to the compute of {owner}'s run "
             f"({wb.flops_spent(owner, seed):.3g} model FLOPs)")
        wb.train(config.methods, seeds=[seed], at=owner)
    _say("evaluating every method on valid and test")
    runs = wb.method_runs(config.methods)  # the first seed's: samples and expert figures
    _say("writing tables, figures and samples")
    table, flops_table = report_tables(wb, runs, config.methods)
    figures = report_figures(wb, runs, config.methods)
    samples = sample_experts(wb, config)
    (out / "samples.md").write_text(samples, encoding="utf-8")
    attribution = report_attribution(wb, config)
    sections = [report_profiles(wb, config.methods), report_routing(wb, config.methods)]
    path = out / "report.md"
    path.write_text(report_markdown(wb, runs, table, figures, samples,
                                    time.perf_counter() - started, attribution,
                                    [s for s in sections if s], flops_table=flops_table),
                    encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the report


def report_tables(wb: Workbench, runs: list, methods: list[str]
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """tables/methods (at equal updates) and tables/methods_equal_flops (at equal training
    compute), over the seeds when there are several, and tables/clusters (the first seed's at
    equal updates: expert k of one seed is not expert k of another)."""
    from moelab import report

    table = wb.method_table(methods)
    wb.export_table(table, "tables/methods")
    flops_table = wb.method_table(methods, at="flops")
    wb.export_table(flops_table, "tables/methods_equal_flops")
    mixtures = {run.name: run.test for run in runs if run.name != "dense"}
    if mixtures:
        wb.export_table(report.cluster_table(mixtures), "tables/clusters")
    return table, flops_table


FIGURE_CAPTIONS = {
    "compute_curves": "Validation perplexity against training compute",
    "perplexity_by_domain": "Test perplexity per method and domain",
    "responsibilities": "Responsibilities: domains x experts",
    "training_curves": "Training and validation curves",
    "expert_usage": "Expert usage over training",
}


def report_figures(wb: Workbench, runs: list, methods: list[str]) -> list[str]:
    """Write the figures under figures/; -> the names written (no mixture: no expert plots).

    Over several seeds, perplexities and curves show the mean with one standard deviation; the
    expert figures show the first seed (experts are numbered apart in each seed)."""
    import matplotlib.pyplot as plt

    from moelab import report

    mixtures = {run.name: run.test for run in runs if run.name != "dense"}
    if len(wb.seeds) == 1:
        tests = {run.name: run.test for run in runs}
        histories = {run.name: run.history for run in runs}
    else:
        tests = {m: [wb.evaluate(m, "test", seed=s) for s in wb.seeds] for m in methods}
        histories = {m: [wb.run(m, s).history for s in wb.seeds] for m in methods}
    owners = {seed: wb.budget(methods, seed) for seed in wb.seeds}
    at_flops = {m: [wb.run(m, seed, owners[seed]).history for seed in wb.seeds]
                for m in methods}
    figures = {
        "compute_curves": report.compute_curves(at_flops,
                                                title=FIGURE_CAPTIONS["compute_curves"]),
        "perplexity_by_domain": report.perplexity_by_domain(
            tests, title=FIGURE_CAPTIONS["perplexity_by_domain"]),
        "training_curves": report.training_curves(histories),
    }
    if mixtures:
        figures["responsibilities"] = report.responsibility_heatmap(mixtures)
        figures["expert_usage"] = report.expert_usage(
            {run.name: run.history for run in runs if run.name != "dense"})
    for name, fig in figures.items():
        wb.save_figure(fig, f"figures/{name}")
        plt.close(fig)
    return list(figures)


def sample_experts(wb: Workbench, config: DemoConfig) -> str:
    """Markdown: a continuation of the empty prompt from every expert of every method."""
    from moelab.generate import GenerationConfig, generate

    settings = GenerationConfig(max_new_tokens=SAMPLE_TOKENS[wb.preset], sampling=True,
                                top_p=0.9, seed=config.seed)
    lines = ["# Samples", "",
             f"Each expert continues the empty prompt (nucleus sampling, top-p 0.9, "
             f"{settings.max_new_tokens} tokens at most, seed {config.seed}); "
             "line breaks are shown as ⏎.", ""]
    for method in config.methods:
        run = wb.run(method)
        lines += [f"## {method}", ""]
        for k in range(run.num_experts):
            text = generate(run.model, run.tokenizer, "", expert=k, config=settings)
            shown = text.strip().replace("|", "\\|").replace("\n", " ⏎ ")
            lines.append(f"- **expert {k}**: {shown or '(ends at once)'}")
        lines.append("")
    return "\n".join(lines)


def report_attribution(wb: Workbench, config: DemoConfig) -> pd.DataFrame | None:
    """Per mixture method and training seed, each expert's owned domain against the domain its
    samples read as (moelab.eval.attribution); exported as tables/attribution. None: not asked
    for."""
    from moelab.eval.attribution import attribution_score

    mixtures = [m for m in config.methods if m != "dense"]
    if not config.attribution_samples or not mixtures:
        return None
    _say("attributing each expert's samples to a domain")
    parts = []
    for seed in wb.seeds:
        for method in mixtures:
            table = wb.attribution(method, seed=seed, per_expert=config.attribution_samples,
                                   max_new_tokens=SAMPLE_TOKENS[wb.preset],
                                   sampling_seed=config.seed)
            parts.append(table.assign(method=method, seed=seed,
                                      score=attribution_score(table)).reset_index())
    rows = pd.concat(parts).set_index("method")[["seed", "expert", "owned domain",
                                                 "samples read as", "share", "match", "score"]]
    rows.attrs["notes"] = [
        *table.attrs["notes"], f"{config.attribution_samples} samples per expert "
        f"({SAMPLE_TOKENS[wb.preset]} tokens at most, seed {config.seed}); score: the share of "
        "the method's experts that match."]
    wb.export_table(rows, "tables/attribution", formats=("csv",))
    return rows


def headline_method(methods: list[str]) -> str | None:
    """The mixture the report reads first: hMoEup (the original fairseq workflow's method) when
    trained, else the first mixture; None without one."""
    mixtures = [m for m in methods if m != "dense"]
    return "hMoEup" if "hMoEup" in mixtures else (mixtures[0] if mixtures else None)


def report_profiles(wb: Workbench, methods: list[str]) -> str | None:
    """What each expert of the headline method has learnt on valid (moelab.eval.profiles): the
    report's section, with figures/expert_profiles; None without a mixture."""
    import matplotlib.pyplot as plt

    from moelab import report

    method = headline_method(methods)
    if method is None:
        return None
    _say(f"profiling the experts of {method}")
    profiles = wb.expert_profiles(method, "valid")
    fig = report.expert_profiles_figure(profiles)
    wb.save_figure(fig, "figures/expert_profiles")
    plt.close(fig)
    return report.expert_profiles_markdown(profiles, method=method,
                                           figure="figures/expert_profiles.png")


ROUTING_PREFIXES = (16, 32, 64, 128)  # M: the prefix lengths routed systems (DEMix, BTM) route from
ROUTING_TOP_K = (1, 2)


def report_routing(wb: Workbench, methods: list[str]) -> str | None:
    """Routed against full inference for the headline method on test (moelab.eval.routing): the
    report's section, with figures/routing and tables/routing; None without a mixture."""
    import matplotlib.pyplot as plt

    from moelab import report
    from moelab.eval.routing import routing_curve

    method = headline_method(methods)
    if method is None:
        return None
    _say(f"routing {method}'s test documents from their first tokens")
    run = wb.run(method)
    curve = routing_curve(run.model, run.dataset("test"), prefixes=ROUTING_PREFIXES,
                          top_k=ROUTING_TOP_K)
    wb.export_table(curve, "tables/routing", formats=("csv", "md"))
    fig = report.routing_curves(curve, title=f"{method}, test split")
    wb.save_figure(fig, "figures/routing")
    plt.close(fig)
    shown = curve[["prefix", "top_k", "documents", "mixture", "routed", "gap", "accuracy",
                   "winner_in_chosen", "forwards_per_doc_token_full",
                   "forwards_per_doc_token_routed"]]
    return "\n".join([
        f"## Routed inference ({method}, test split)", "",
        "The first M tokens of each document are read by every expert; the top K' experts by "
        "the posterior after them read the rest, weighted by that posterior (moelab.eval.routing, "
        "`eval-lm --routing prefix:M,topk:K'`). On the tokens after the prefix: the full "
        "mixture's perplexity and the routed one, the gap (routed - full, nats/token) and "
        "routing accuracy (the prefix's top expert is the whole document's); on every token of "
        "the routed documents, prefix included: expert forwards per token of each pass. "
        "Documents of at most M tokens are left out.", "",
        report.to_markdown(shown.set_index("prefix")), "",
        f"![Routed against full inference ({method})](figures/routing.png)", ""])


def attribution_lines(rows: pd.DataFrame, seeds: list[int]) -> list[str]:
    """The report's section: the score per method (mean ± std over seeds), then the first
    seed's experts."""
    scores = rows.groupby(["method", "seed"], sort=False)["score"].first()
    lines = []
    for method, per_seed in scores.groupby(level=0, sort=False):
        values = per_seed.to_numpy(float)
        spread = f" ± {values.std(ddof=1):.2f} over {len(values)} seeds" if len(values) > 1 else ""
        first = rows[(rows.index == method) & (rows["seed"] == seeds[0])]
        experts = "; ".join(f"{r['expert'].removeprefix('expert_')} owns "
                            f"{r['owned domain'] or 'nothing (unused)'}, "
                            f"reads as {r['samples read as'] or '(no text)'}"
                            for _, r in first.iterrows())
        lines.append(f"- **{method}**: {values.mean():.2f}{spread} of its experts write the "
                     f"domain they own (seed {seeds[0]}: {experts}).")
    return lines


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


# The reading calls a clustering a split of the domains only when its posterior is sure: mean
# max posterior >= moelab.eval.lm.FLAT_MAX_POSTERIOR and expert spread >= FLAT_EXPERT_SPREAD
# (defined, with their reasons, once in moelab.eval.lm and shared with eval-lm and the tables).
NMI_ALIGNED = 0.7  # NMI from which a sure posterior's experts "line up with the domains"
NMI_PARTLY = 0.4  # ... and "partly line up"; below it they do not


def _doubt(row: pd.Series) -> list[str] | None:
    """Why this method's posterior is flat (by flat_reasons); None when the table has no
    confidence columns to judge by."""
    if "mean max posterior" not in row.index or "expert spread" not in row.index:
        return None
    return flat_reasons(row["mean max posterior"], row["expert spread"], int(row["K"]))


def equal_compute_lines(table: pd.DataFrame, budget_method: str, seeds: int = 1) -> list[str]:
    """The reading of the table at equal training compute: what each method reached, in how
    many updates, and whether any mixture beats dense there."""
    ppl, updates = table["test ppl"], table["updates"]
    reached = ", ".join(f"{m} {_fmt(ppl[m])} after {updates[m]:.0f} updates" for m in table.index)
    which = ("in this one training seed" if seeds == 1 else
             f"means over {seeds} training seeds (standard deviations in the table)")
    line = (f"- **At equal training compute.** Every method trained until it had spent the "
            f"model FLOPs of {budget_method}'s run; test perplexity, {which}: {reached}.")
    if "dense" in table.index and len(table.index) > 1:
        dense = ppl["dense"]
        below = [m for m in table.index if m != "dense" and ppl[m] < dense]
        if below:
            line += (f" {', '.join(below)} {'is' if len(below) == 1 else 'are'} below dense at "
                     "equal compute.")
        else:
            ratio = updates["dense"] / updates[budget_method]
            line += (f" No mixture beats dense at equal compute: dense spends nothing on "
                     f"scoring K experts, so the same FLOPs buy it {ratio:.1f}x the updates of "
                     f"{budget_method}, and every expert here shares dense's one network.")
    return [line]


def reading(table: pd.DataFrame, max_update: int,
            heatmap: str = "figures/responsibilities.png", seeds: int = 1,
            flops_table: pd.DataFrame | None = None, budget_method: str | None = None
            ) -> list[str]:
    """A short, honest reading of the method tables, generated from their numbers.

    table: at equal updates; flops_table (with budget_method, the method whose compute every
    method spent): at equal training compute, read first. heatmap: where the reader finds the
    responsibility heatmap (the report's figure, or the notebook that draws it). seeds: how
    many training seeds the tables' numbers are means of.
    """
    lines = []
    if flops_table is not None and budget_method is not None:
        lines += equal_compute_lines(flops_table, budget_method, seeds)
    ppl = table["test ppl"]
    if "dense" in table.index and "hMoEup" in table.index:
        dense, moe = ppl["dense"], ppl["hMoEup"]
        verdict = ("beats" if moe < dense else "does not beat")
        lines.append(
            f"- **hMoEup vs dense at equal updates.** hMoEup's mixture perplexity on test is "
            f"{_fmt(moe)} against "
            + (f"dense's {_fmt(dense)}: in this one training seed it {verdict} the dense "
               f"baseline at an equal number of updates ({max_update}), where each of its "
               "updates costs several of dense's (the train FLOPs column); seeds move these "
               "numbers a lot, so compare over several (`moelab demo --seeds 3`)."
               if seeds == 1 else
               f"dense's {_fmt(dense)}, means over {seeds} training seeds: on average it "
               f"{verdict} the dense baseline at an equal number of updates ({max_update}), "
               "where each of its updates costs several of dense's (the train FLOPs column); "
               "the standard deviations are in the table.") + (
                "" if moe < dense else
                " Every update of a mixture trains each expert on only the chunks it wins, and "
                "the mixture pays log K nats per document for not knowing the domain; in a short "
                "run the shared model has seen the same tokens as dense, so the gain from "
                "specialised experts has not yet outweighed that cost."))
    if "hMoEup" in table.index:
        row = table.loc["hMoEup"]
        nmi = row["NMI"]
        doubt = _doubt(row)
        used = (f"{int(row['experts used'])} of {int(row['K'])} experts win at least 1/(4K) of "
                f"the documents (see {heatmap}).")
        if doubt:  # a flat posterior is never a clean split, whatever its NMI
            lines.append(
                f"- **Do the experts find the domains?** Not clearly: hMoEup's posterior is "
                f"flat or its experts barely differ ({'; '.join(doubt)}), so its NMI "
                f"{_fmt(nmi)} and ARI {_fmt(row['ARI'])} must not be read as a clean split of "
                f"the domains; {used}")
        else:
            agree = ("line up with the domains" if nmi >= NMI_ALIGNED else
                     "partly line up with the domains" if nmi >= NMI_PARTLY else
                     "do not line up with the domains")
            sure = ("" if doubt is not None else
                    " (the posterior's confidence is not in the table: read the NMI with care)")
            lines.append(
                f"- **Do the experts find the domains?** hMoEup's experts {agree}{sure}: NMI "
                f"{_fmt(nmi)}, ARI {_fmt(row['ARI'])} between each test document's most probable "
                f"expert and its domain; {used}")
    flat = {m: _doubt(table.loc[m]) for m in table.index if m != "hMoEup"}
    flat = {m: reasons for m, reasons in flat.items() if reasons}
    if flat:
        lines.append(
            "- **Flat posteriors or near-identical experts.** " + "; ".join(
                f"{m} ({', '.join(reasons)}; NMI {_fmt(table.loc[m].get('NMI', math.nan))})"
                for m, reasons in flat.items())
            + ": each argmax is won by a hair, so these NMI/ARI must not be read as a clean "
            "split of the domains.")
    for method in ("hMoElp", "sMoElp"):
        if method in table.index:
            row = table.loc[method]
            used, K = int(row["experts used"]), int(row["K"])
            if used <= K // 2:  # most experts idle: the failure learned priors are known for
                verdict = (f" The mixture has collapsed onto {used} expert{'s' * (used > 1)}, "
                           "as learned priors tend to.")
            elif used < K:
                verdict = f" {K - used} expert{'s' * (K - used > 1)} left unused; no collapse."
            else:
                verdict = " No collapse in this run."
            if _doubt(row):  # usage counts argmaxes: a flat posterior's are won by a hair
                verdict += (" Its posterior is flat or its experts barely differ, though "
                            "(see above): experts that win documents by such margins are used "
                            "in name only.")
            lines.append(
                f"- **Learned prior ({method}).** {used} of {K} experts used, usage entropy "
                f"{_fmt(abs(row['usage entropy']))} nats (uniform: {_fmt(math.log(K))})."
                + verdict)
    soft = [m for m in ("sMoEup", "sMoElp") if m in table.index]
    if soft:
        best = min(soft, key=lambda m: ppl[m])
        lines.append(
            f"- **Soft EM.** {best} reaches test perplexity {_fmt(ppl[best])}; soft EM trains "
            "every expert on every chunk (weighted by its responsibility), which costs K "
            "backward passes per update: the train FLOPs column.")
    lines.append(
        "- **Oracle.** The oracle perplexity picks the best expert per document after seeing "
        "it: a bound, not a density. Compare methods by mixture perplexity.")
    return lines


def report_markdown(wb: Workbench, runs: list, table: pd.DataFrame, figures: list[str],
                    samples: str, seconds: float, attribution: pd.DataFrame | None = None,
                    sections: Sequence[str] = (), flops_table: pd.DataFrame | None = None
                    ) -> str:
    from moelab.report import mean_std, to_markdown
    from moelab.report.machine import cpu_model, device_name

    options = {**TRAIN_PRESETS[wb.preset], **wb.train_options}  # what actually trained
    device = (device_name(wb.device) if wb.device == "cuda" else
              f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)")
    size = ", ".join(f"{k}={v}" for k, v in options.items()
                     if k not in ("log_interval", "validate_interval_updates"))
    # the precision each run trained in, as its checkpoint records it
    trained_in = sorted({wb.run(r.name).config.train.precision for r in runs})
    estep = sorted({wb.run(r.name).config.train.estep_dtype or "float32" for r in runs})
    several = len(wb.seeds) > 1
    methods = [r.name for r in runs]

    def means(t: pd.DataFrame) -> pd.DataFrame:
        return t[t["seed"] == "mean"].drop(columns="seed") if several else t

    def shown(t: pd.DataFrame) -> str:
        return to_markdown(mean_std(t) if several else t)

    owners = sorted({wb.budget(methods, seed) for seed in wb.seeds})
    trained_threads = wb.threads_trained_with(methods, at="flops" if flops_table is not None
                                              else None)
    columns = (
        "Mixture (`ppl`) and oracle perplexity on valid and test; what training cost (updates, "
        "model FLOPs, seconds spent training, validation excluded); per-domain mixture "
        "perplexity, experts used, usage entropy and NMI/ARI on test with the posterior's "
        "confidence beside them (mean max posterior, posterior entropy, expert spread: a flat "
        "posterior's NMI is not a clean split); training speed."
        + (" Mean ± standard deviation over the training seeds; each seed's row is in the "
           "CSV." if several else ""))
    compute = [] if flops_table is None else [
        "## Methods at equal training compute", "",
        f"Every method trained until it had spent the model FLOPs of {' / '.join(owners)}'s "
        f"run of {options['max_update']} updates (the most expensive): its run itself, and each "
        "cheaper method's run continued from its last update. " + columns, "",
        shown(flops_table), "",
        "Also as `tables/methods_equal_flops.csv` and `.tex`.", ""]
    lines = [
        "# moelab demo report", "",
        f"moelab {__version__}, torch {torch.__version__}, on {device}; preset `{wb.preset}` "
        f"({size}); K = {wb.num_experts} for the mixtures; the whole run took "
        f"{seconds / 60:.1f} minutes (cached stages excluded). Precision: M-step "
        f"{'/'.join(trained_in)}, E-step {'/'.join(estep)}, validation and evaluation float32. "
        f"Training seed{'s' * several} {', '.join(map(str, wb.seeds))}; torch threads "
        f"{'/'.join(trained_threads)} in training, {torch.get_num_threads()} in evaluation (the "
        "same seed, thread count and machine give the same numbers).",
        "",
        "## Reading", "",
        *reading(means(table), options["max_update"], seeds=len(wb.seeds),
                 flops_table=None if flops_table is None else means(flops_table),
                 budget_method=" / ".join(owners)), "",
        *compute,
        "## Methods at equal updates", "",
        f"Every method trained {options['max_update']} updates. " + columns, "",
        shown(table), "",
        "Also as `tables/methods.csv` and `tables/methods.tex`; cluster agreement per method in "
        "`tables/clusters.*`.", "",
        "## Figures", "",
        *(f"![{FIGURE_CAPTIONS[name]}](figures/{name}.png)\n" for name in FIGURE_CAPTIONS
          if name in figures),
        "Each figure is also saved as SVG and PDF."
        + (" Perplexities and curves: mean with one standard deviation over the seeds; the "
           f"expert figures show seed {wb.seeds[0]} (each seed numbers its experts apart)."
           if several else ""), "",
        *(["## Samples you can attribute", "",
           "A tf-idf domain classifier fit on the training documents labels each expert's "
           "samples; an expert owns the domain of its highest mean responsibility on valid, and "
           "one that wins under 1/(4K) of the valid documents owns nothing. An expert matches "
           "when strictly more than half of its samples read as the domain it owns; the score "
           "is the share of the K experts that match, one that owns nothing counting as one "
           "that does not (`tables/attribution.csv`).", "",
           *attribution_lines(attribution, wb.seeds), ""] if attribution is not None else []),
        *(part for section in sections for part in (section, "")),
        samples.replace("# Samples", "## Samples", 1),
    ]
    return "\n".join(lines) + "\n"
