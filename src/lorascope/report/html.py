"""One self-contained HTML report per run: figures embedded as base64 PNG, CSS and JS inline, nothing fetched.

Every string that comes from data (names, config, contexts, table cells) goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorascope.io import write_text
from lorascope.report._assets import CSS, JS
from lorascope.report.changed import changed_section
from lorascope.report.checkpoints import checkpoints_section
from lorascope.report.contexts import feature_html
from lorascope.report.figures import FIGURES, render_figures
from lorascope.report.findings import Finding, compute_findings
from lorascope.report.run import RunData, load_run

MAX_FEATURES_PER_GROUP = 40
_NUM_COLS = {"layer", "rank", "value", "ci_low", "ci_high", "null_value", "n", "d"}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(x)
    if not math.isfinite(v):
        return "—"
    return f"{int(v)}" if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"


def _header(run: RunData) -> str:
    m = run.meta
    adapters = m.get("adapters") or {}
    if isinstance(adapters, dict):
        order = sorted(
            adapters.items(), key=lambda kv: (0, kv[1], str(kv[0])) if isinstance(kv[1], int) else (1, 0, str(kv[0]))
        )
        ad_txt = ", ".join(
            f"{_e(k)} (rank {_e(v)})" if not isinstance(v, int) or v >= 0 else _e(k) for k, v in order
        )  # rank -1: a whole model, or a rank not known
    else:
        ad_txt = _e(adapters)
    facts = [
        ("Model", _e(m.get("model", "unknown"))),
        ("d_model / layers", f"{_e(m.get('d_model', '?'))} / {_e(m.get('n_layers', '?'))}"),
        ("Layers analysed", _e(", ".join(map(str, m.get("layers", []))) or "?")),
        ("Adapters", ad_txt or "?"),
        ("Created", _e(m.get("created", "?"))),
        ("Results", f"{len(run.df)} rows, {run.df['family'].nunique()} families"),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    timings = m.get("timings") or {}
    trows = "".join(f"<tr><td>{_e(k)}</td><td class='num'>{_num(v)}</td></tr>" for k, v in timings.items())
    if timings:
        total = sum(float(v) for v in timings.values() if isinstance(v, (int, float)))
        trows += f"<tr class='total'><td>total</td><td class='num'>{_num(round(total, 1))}</td></tr>"
    ttable = (
        (f"<table class='small'><thead><tr><th>stage</th><th>seconds</th></tr></thead><tbody>{trows}</tbody></table>")
        if trows
        else "<p class='muted'>no timings recorded</p>"
    )
    config = json.dumps(m.get("config", {}), indent=2, sort_keys=True, default=str)
    return (
        f"<header><h1>lorascope report <span class='muted'>{_e(m.get('name', run.run_dir.name))}</span></h1>"
        f"<div class='grid2'><dl class='facts'>{dl}</dl><div><h3>Timings</h3>{ttable}</div></div>"
        f"<details><summary>Configuration</summary><pre>{_e(config)}</pre></details></header>"
    )


def _findings(findings: list[Finding]) -> str:
    items = []
    for f in findings:
        cls = f.verdict.replace(" ", "-")
        items.append(
            f"<div class='finding'><span class='badge {cls}'>{_e(f.verdict)}</span> "
            f"<strong>{_e(f.title)}</strong><p>{_e(f.text)}</p>"
            f"<p class='rule'>Rule: {_e(f.rule)}.</p></div>"
        )
    return "<section id='findings'><h2>Findings</h2>" + "".join(items) + "</section>"


def _figures(made: dict[str, list[Path]]) -> str:
    parts = []
    for spec in FIGURES:
        pngs = [p for p in made.get(spec.name, []) if p.suffix == ".png"]
        if not pngs:
            continue
        b64 = base64.b64encode(pngs[0].read_bytes()).decode("ascii")
        parts.append(
            f"<figure id='fig-{_e(spec.name)}'><h3>{_e(spec.title)}</h3>"
            f"<img alt='{_e(spec.title)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{_e(spec.caption)}</figcaption></figure>"
        )
    missing = [s.title for s in FIGURES if s.name not in made]
    note = f"<p class='muted'>Not drawn (no data in this run): {_e('; '.join(missing))}.</p>" if missing else ""
    return "<section id='figures'><h2>Figures</h2>" + "".join(parts) + note + "</section>"


def _table(df, table_id: str, cols: Iterable[str]) -> str:
    cols = list(cols)
    head = "".join(f"<th data-col='{_e(c)}'>{_e(c)}</th>" for c in cols)
    body = []
    for rec in df[cols].itertuples(index=False):
        cells = []
        for c, v in zip(cols, rec, strict=True):
            if c in _NUM_COLS:
                fv = float(v) if v is not None else math.nan
                dv = repr(fv) if math.isfinite(fv) else ""
                cells.append(f"<td class='num' data-v='{dv}'>{_num(v)}</td>")
            else:
                cells.append(f"<td>{_e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table id='{table_id}' class='data'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _results(df) -> str:
    return (
        "<section id='results'><h2>All results</h2><p class='muted'>Click a column header to sort; type to "
        "filter rows (matches any cell). CIs are 95% percentile bootstrap intervals; the ci_unit column says what "
        "they resample: <b>document</b> (held-out documents, the default for every token statistic), <b>seed</b> "
        "(SAE training seeds) or <b>atom</b> (the atoms of one dictionary, describing that dictionary only). "
        "The null column is the control each value is read against (see docs/statistics.md in the lorascope "
        "repository).</p>"
        "<input id='filter' type='search' placeholder='filter rows, e.g. mmcs or L15' aria-label='filter'> "
        f"<span id='rowcount' class='muted'>{len(df)} rows</span>"
        f"<div class='scroll'>{_table(df, 'results-table', df.columns)}</div></section>"
    )


def _contexts(contexts: list[dict[str, Any]]) -> str:
    if not contexts:
        return (
            "<section id='contexts'><h2>Top-activating contexts</h2><p class='muted'>No contexts in this run."
            "</p></section>"
        )
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for entry in contexts:
        groups.setdefault((int(entry.get("layer", -1)), str(entry.get("adapter", ""))), []).append(entry)
    parts = []
    for (layer, adapter), entries in sorted(groups.items()):
        shown = entries[:MAX_FEATURES_PER_GROUP]
        more = (
            f"<p class='muted'>{len(entries) - len(shown)} more features in contexts.json</p>"
            if len(entries) > len(shown)
            else ""
        )
        parts.append(
            f"<details open><summary>Layer {layer} · {_e(adapter)} ({len(entries)} features)</summary>"
            + "".join(feature_html(e) for e in shown)
            + more
            + "</details>"
        )
    return (
        "<section id='contexts'><h2>Top-activating contexts</h2><p class='muted'>Adapter-SAE latents with the "
        "held-out tokens on which they fire hardest; the token is <mark>highlighted</mark>, the number is its "
        "activation, ↵ marks a line break.</p>" + "".join(parts) + "</section>"
    )


def _absorption(df) -> str:
    sub = df[df["family"] == "absorption"]
    if sub.empty:
        return (
            "<section id='absorption'><h2>Absorption &amp; splitting</h2><p class='muted'>Not run for this "
            "experiment (enable the absorption evaluation to measure feature absorption and splitting on the "
            "first-letter task).</p></section>"
        )
    piv = sub.pivot_table(index=["layer", "adapter"], columns="metric", values="value", aggfunc="first")
    piv = piv.reset_index()
    piv.columns = [str(c) for c in piv.columns]
    return (
        "<section id='absorption'><h2>Absorption &amp; splitting</h2><p class='muted'>First-letter task "
        "(SAEBench protocol). splitting_k = latents needed by the k-sparse probe (1 = no split); "
        "absorption_fraction = share of probe true positives absorbed by other latents.</p>"
        f"<div class='scroll'>{_absorption_table(piv)}</div></section>"
    )


def _absorption_table(piv) -> str:
    cols = list(piv.columns)
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td class='num'>{_num(v)}</td>" if c != "adapter" else f"<td>{_e(v)}</td>"
            for c, v in zip(cols, rec, strict=True)
        )
        + "</tr>"
        for rec in piv.itertuples(index=False)
    )
    return f"<table class='data'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_report(run: RunData, figures: dict[str, list[Path]]) -> str:
    """The report as one HTML string (figures read from the given PNG paths and embedded)."""
    from lorascope import __version__

    title = _e(f"lorascope report — {run.meta.get('name', run.run_dir.name)}")
    nav = (
        "<nav><a href='#changed'>What changed</a>"
        "<a href='#findings'>Findings</a><a href='#figures'>Figures</a><a href='#results'>Results table</a>"
        "<a href='#contexts'>Contexts</a><a href='#absorption'>Absorption</a></nav>"
    )
    body = (
        _header(run)
        + nav
        + changed_section(run.run_dir, run.df, run.meta)
        + _findings(compute_findings(run.df))
        + _figures(figures)
        + checkpoints_section(run.df, run.contexts)
        + _results(run.df)
        + _contexts(run.contexts)
        + _absorption(run.df)
        + f"<footer>Generated by lorascope {_e(__version__)}. Self-contained: no network access needed."
        "</footer>"
    )
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{title}</title>"
        f"<style>{CSS}</style></head><body><main>{body}</main><script>{JS}</script></body></html>\n"
    )


def write_report(run_dir: str | Path, make_figures: bool = True) -> Path:
    """Draw the figures (into run_dir/figures) and write run_dir/report.html; returns the report's path."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    figures = (
        render_figures(run.df, run_dir / "figures", run.arrays, run_dir=run_dir)
        if make_figures
        else {s.name: [p] for s in FIGURES if (p := run_dir / "figures" / f"{s.name}.png").is_file()}
    )
    out = run_dir / "report.html"
    write_text(out, render_report(run, figures))
    return out
