"""Report stage: figures, findings with verdicts, top-activating contexts, one self-contained HTML file.

Entry points: ``write_report(run_dir)`` (figures + report.html), ``make_all_figures(run_dir)``,
``compute_findings(df)`` / ``findings_markdown(df)``, ``top_activating_contexts(...)`` for the pipeline, and
``write_fake_run(folder, seed)`` for a synthetic run folder to preview the report.
"""

from lorascope.report.contexts import TokenSource, context_html, feature_html, top_activating_contexts
from lorascope.report.demo import write_fake_run
from lorascope.report.figures import FIGURES, make_all_figures, render_figures
from lorascope.report.findings import Finding, compute_findings, findings_markdown
from lorascope.report.html import render_report, write_report
from lorascope.report.run import RunData, load_run

__all__ = [
    "FIGURES",
    "Finding",
    "RunData",
    "compute_findings",
    "TokenSource",
    "context_html",
    "feature_html",
    "findings_markdown",
    "load_run",
    "make_all_figures",
    "render_figures",
    "render_report",
    "top_activating_contexts",
    "write_fake_run",
    "write_report",
]
