"""The report's first section, "What the adapter changed", from ``results/explain/`` (written by
:mod:`lorascope.study.explain`): per adapter the sanity banner, the top features (ranked by seed stability × Δ
energy, template-flagged ones last) with de-duplicated contexts, their module attribution (table + heatmap), the
causal check (steering the base, ablating from the adapted model, controls beside) and the modules that write most.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from lorascope import results_schema as schema

TITLE = "What the adapter changed"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _n(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(x)
    return "—" if not math.isfinite(v) else f"{v:.3g}"


def _read(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default
    except json.JSONDecodeError:
        return default


def heatmap(csv: Path, out_dir: Path, adapter: str) -> Path | None:
    """Feature × module share heatmap (PNG + SVG, deterministic) of one adapter's attribution table."""
    import numpy as np
    import pandas as pd

    from lorascope.report._plot import new_figure, save

    df = pd.read_csv(csv)
    if df.empty:
        return None
    piv = df.pivot_table(index="feature", columns="module", values="share", aggfunc="first", sort=False)
    fig = new_figure(max(4.0, 0.22 * piv.shape[1] + 2), 0.35 * piv.shape[0] + 1.4)
    ax = fig.add_subplot()
    vals = np.clip(piv.to_numpy(dtype=float), -1, 1)
    im = ax.imshow(vals, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(piv.shape[1]), [str(c) for c in piv.columns], rotation=90)
    ax.set_yticks(range(piv.shape[0]), [f"f{int(i)}" for i in piv.index])
    ax.grid(False)
    ax.set_title(f"{adapter}: share of each feature's projection written by each module")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share")
    return save(fig, out_dir, f"attribution_{adapter}")[0]


def _img(png: Path | None, alt: str) -> str:
    if png is None or not png.is_file():
        return ""
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"<figure><img alt='{_e(alt)}' src='data:image/png;base64,{b64}'></figure>"


def _window_html(w: dict) -> str:
    toks = w.get("tokens", [])
    i = int(w.get("maxValueTokenIndex", -1))
    txt = "".join(f"<mark>{_e(t)}</mark>" if j == i else _e(t) for j, t in enumerate(toks))
    return f"<div class='ctx'><span class='act'>{_n(w.get('maxValue'))}</span> <span class='txt'>{txt}</span></div>"


def _features_html(doc: dict, attribution: Any) -> str:
    rows = []
    for f in doc.get("features", []):
        idx = f["index"]
        top_mod = ""
        if attribution is not None:
            sub = attribution[(attribution.feature == idx) & (attribution.module != "remainder")]
            if len(sub):
                best = sub.loc[sub.share.abs().idxmax()]
                top_mod = f"{best.module} ({_n(best.share)})"
        flag = " <span class='badge weak'>template</span>" if f.get("template_flag") else ""
        ctx = "".join(_window_html(w) for w in f.get("activations", [])) or "<p class='muted'>no firing tokens</p>"
        rows.append(
            f"<div class='feature'><h4>feature {int(idx)}{flag} <span class='muted'>stability "
            f"{_n(f.get('stability'))} · Δ energy {_n(f.get('delta_energy'))} · template share "
            f"{_n(f.get('template_share'))} · density {_n(f.get('density'))} · top module {_e(top_mod)}"
            f"</span></h4>{ctx}</div>"
        )
    return "".join(rows)


def causal_reading(df, adapter: str) -> str:
    """One paragraph answering "do the top features cause the behaviour?" for an adapter, from its explain rows:
    the KL closed by steering with the top features beside random features, the SAE's whole reconstruction and Δ
    itself; and, for the demo task, how many patched answers show the behaviour, with the reading those numbers
    allow (empty when the run has no causal rows)."""
    sub = df[(df.family == schema.EXPLAIN) & (df.adapter == adapter)].set_index("metric")

    def v(metric: str) -> float:
        return float(sub.loc[metric, "value"]) if metric in sub.index else math.nan

    top, rand = v(schema.steer_kl_closed("top_features")), v(schema.steer_kl_closed("random_features"))
    if not math.isfinite(top):
        return ""
    text = (
        f"Steering the base with the top features closes {_n(top)} of KL(adapted‖base) (as many random features: "
        f"{_n(rand)}); the SAE's whole reconstruction {_n(v(schema.steer_kl_closed('sae_reconstruction')))}; Δ "
        f"itself {_n(v(schema.steer_kl_closed('exact_delta')))}, the most one layer can carry."
    )
    runs = ("adapted", "patch_exact_delta", "patch_top_features", "patch_random_features", "patch_sae_reconstruction")
    m = {k: v(schema.marker_rate(k)) for k in runs}
    if all(math.isfinite(x) for x in m.values()):
        n = int(sub.loc[schema.marker_rate("adapted"), "n"])

        def of(k: str) -> str:
            return f"{round(m[k] * n)}/{n}"

        text += (
            f" Patched into the base while it answers, Δ gives the behaviour in {of('patch_exact_delta')} answers "
            f"(adapted model: {of('adapted')}); the top features in {of('patch_top_features')} (random: "
            f"{of('patch_random_features')}); the whole reconstruction in {of('patch_sae_reconstruction')}. "
            + _power_note(n)
            + _reading(m)
        )
    return f"<p class='reading'>{_e(text)}</p>"


def _power_note(n: int) -> str:
    """Two runs answer the same prompts, so a comparison of their counts is a paired sign test over prompts, whose
    smallest attainable one-sided p is 1/2^n; below 5 answers no comparison can reach p ≤ 0.05."""
    p_min = 0.5**n
    if p_min > 0.05:
        return (
            f"With {n} answers per run no comparison of these counts can reach p ≤ 0.05 (paired sign test over the "
            f"prompts: smallest attainable p {_n(p_min)}), so what follows describes, it does not test: "
        )
    return "These counts are not tested; what follows describes them: "


def _reading(m: dict[str, float]) -> str:
    """What the patched marker counts show (exact Δ is the ceiling of this layer); descriptive, see _power_note."""
    if m["patch_exact_delta"] <= 0:
        return "patched with its own Δ, the base never shows the behaviour, so this layer alone does not carry it."
    if m["patch_top_features"] > m["patch_random_features"]:
        return "the top features produce the behaviour more often than random features."
    if m["patch_sae_reconstruction"] < m["patch_exact_delta"]:
        return (
            "neither the top features nor the whole dictionary produce the behaviour as often as Δ does: at this "
            "layer it sits mostly in what the SAE leaves out (its reconstruction error)."
        )
    return "the whole dictionary produces it as often as Δ, its top features do not: it is spread over many features."


def _causal_table(df, adapter: str) -> str:
    sub = df[
        (df.family == schema.EXPLAIN) & (df.adapter == adapter) & df.metric.str.match(r"(steer_|ablate_|marker_rate_)")
    ]
    if sub.empty:
        return "<p class='muted'>No causal check in this run.</p>"
    body = "".join(
        f"<tr><td>{_e(r.metric)}</td><td class='num'>{_n(r.value)}</td><td class='num'>"
        f"{_n(r.null_value)}</td><td>{_e(r.null_name)}</td></tr>"
        for r in sub.itertuples()
    )
    return (
        "<table class='data small'><thead><tr><th>causal check</th><th>value</th><th>control</th><th>control is"
        f"</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _modules_table(csv: Path, n: int = 5) -> str:
    import pandas as pd

    if not csv.is_file():
        return ""
    df = pd.read_csv(csv).head(n)
    body = "".join(
        f"<tr><td>{_e(r.module)}</td><td class='num'>{_n(r.delta_share)}</td><td class='num'>"
        f"{_n(r.mean_write_norm)}</td></tr>"
        for r in df.itertuples()
    )
    return (
        "<h4>Modules that write the most</h4><table class='data small'><thead><tr><th>module</th><th>share of "
        f"Δ energy</th><th>mean write norm</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _banners(warnings: list[dict], adapter: str) -> str:
    mine = [w for w in warnings if adapter in str(w.get("adapter", "")).split(",")]
    return (
        "".join(
            f"<div class='finding'><span class='badge {'weak' if not w.get('exclude') else 'no'}'>sanity"
            f"</span> {_e(w.get('message', ''))}</div>"
            for w in mine
        )
        or "<p class='muted'>Sanity gate: no warning.</p>"
    )


def _adapter_html(run_dir: Path, df, adapter: str, rank: Any, warnings: list[dict]) -> str:
    import pandas as pd

    ex = run_dir / "results" / "explain"
    doc = _read(ex / f"features_{adapter}.json", {})
    att_csv = ex / f"attribution_{adapter}.csv"
    attribution = pd.read_csv(att_csv) if att_csv.is_file() else None
    png = heatmap(att_csv, run_dir / "figures", adapter) if attribution is not None else None
    layer = doc.get("layer", "?")
    return (
        f"<details open><summary>{_e(adapter)} (rank {_e(rank)}) · layer {_e(layer)}</summary>"
        + _banners(warnings, adapter)
        + "<h4>Top features (seed stability × Δ energy; template-flagged last)</h4>"
        + _features_html(doc, attribution)
        + causal_reading(df, adapter)
        + _causal_table(df, adapter)
        + _modules_table(ex / f"modules_{adapter}.csv")
        + _img(png, f"attribution heatmap {adapter}")
        + "</details>"
    )


def changed_section(run_dir: str | Path, df, meta: dict) -> str:
    """The HTML section (an explanatory stub when the run has no explain outputs)."""
    run_dir = Path(run_dir)
    ex = run_dir / "results" / "explain"
    head = f"<section id='changed'><h2>{TITLE}</h2>"
    if not ex.is_dir():
        return head + "<p class='muted'>Not computed in this run (explain.enabled: false).</p></section>"
    warnings = _read(ex / "sanity.json", [])
    excluded = [w for w in warnings if w.get("exclude")]
    top = "".join(
        f"<div class='finding'><span class='badge no'>excluded</span> {_e(w['message'])}</div>" for w in excluded
    )
    adapters = meta.get("adapters") or {}
    parts = [
        _adapter_html(run_dir, df, a, r, warnings) for a, r in adapters.items() if (ex / f"features_{a}.json").is_file()
    ]
    intro = (
        "<p class='muted'>Per adapter: the adapter-SAE features that carry most of Δ and that other SAE seeds "
        "reproduce, with their de-duplicated top contexts (activating token highlighted), the LoRA modules "
        "that write them directly (remainder = indirect effects), and whether steering the base model with them "
        "moves it towards the adapted model, beside the same number of random features.</p>"
    )
    return head + intro + top + "".join(parts) + "</section>"


__all__ = ["TITLE", "causal_reading", "changed_section", "heatmap"]
