"""Figures (matplotlib) and tables (CSV, Markdown, LaTeX) of trained methods and evaluations.

    from moelab import report
    fig = report.responsibility_heatmap(eval_result)
    report.save_figure(fig, "results/responsibilities")          # .png .svg .pdf
    report.export_table(report.method_table(runs), "results/methods")  # .csv .md .tex
"""

from moelab.report.plots import (
    METHOD_COLORS,
    LiveCurves,
    compute_curves,
    expert_profiles_figure,
    expert_usage,
    perplexity_by_domain,
    responsibility_heatmap,
    routing_curves,
    save_figure,
    training_curves,
)
from moelab.report.tables import (
    MethodRun,
    cluster_table,
    expert_profiles_markdown,
    export_table,
    format_value,
    mean_std,
    method_table,
    over_seeds,
    to_latex,
    to_markdown,
)

__all__ = ["METHOD_COLORS", "LiveCurves", "MethodRun", "cluster_table", "compute_curves",
           "expert_profiles_figure", "expert_profiles_markdown", "expert_usage",
           "export_table", "format_value", "mean_std", "method_table",
           "over_seeds", "perplexity_by_domain",
           "responsibility_heatmap", "routing_curves", "save_figure", "to_latex", "to_markdown",
           "training_curves"]
