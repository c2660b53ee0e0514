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
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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


def _n2(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "—"


def _read(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default
    except json.JSONDecodeError:
        return default


OTHER = "other"  # block column of modules whose name has no leading block index
_BLOCK = re.compile(r"^(\d+)\.(.+)$")


class AttributionGrid(NamedTuple):
    """One adapter's attribution table as small-multiple panels: ``shares[feature, module type, column]``.

    Columns are blocks 0 … max block, then :data:`OTHER` when some module name has no leading ``<int>.``; rows are
    module types (the path after the block index, first-appearance order) then the unnumbered modules by name.
    Cells without a module (another type's column, a block without LoRA) are NaN, never 0."""

    features: list[int]
    types: list[str]
    columns: list[str]
    shares: np.ndarray
    remainder: np.ndarray  # [feature] share left to indirect effects (NaN: no remainder row)


def _short(types: list[str]) -> list[str]:
    """Last path component of each module type (``q_proj``) when those are unambiguous, else the whole path."""
    last = [t.rsplit(".", 1)[-1] for t in types]
    return last if len(set(last)) == len(last) else types


def attribution_grid(df) -> AttributionGrid:
    """Pivot tidy attribution rows (feature, module, share) into an :class:`AttributionGrid`."""
    df = df.drop_duplicates(["feature", "module"])
    features = list(dict.fromkeys(int(f) for f in df.feature))
    mods = df[df.module != "remainder"]
    parsed = {m: _BLOCK.match(str(m)) for m in dict.fromkeys(mods.module)}
    types = list(dict.fromkeys(p.group(2) for p in parsed.values() if p))
    loose = [str(m) for m, p in parsed.items() if not p]
    blocks = [int(p.group(1)) for p in parsed.values() if p]
    n_blocks = max(blocks) + 1 if blocks else 0
    columns = [str(b) for b in range(n_blocks)] + ([OTHER] if loose else [])
    cell = {
        m: (types.index(p.group(2)), int(p.group(1))) if p else (len(types) + loose.index(str(m)), n_blocks)
        for m, p in parsed.items()
    }
    shares = np.full((len(features), len(types) + len(loose), len(columns)), np.nan)
    for f, m, s in zip(mods.feature, mods.module, mods.share, strict=True):
        shares[(features.index(int(f)), *cell[m])] = s
    remainder = np.full(len(features), np.nan)
    rem = df[df.module == "remainder"]
    remainder[[features.index(int(f)) for f in rem.feature]] = rem.share.to_numpy(dtype=float)
    return AttributionGrid(features, _short(types) + loose, columns, shares, remainder)


def _share_limits(shares: np.ndarray) -> tuple[float, str]:
    """Symmetric colour limit (largest |share|, at most 1) and the colour bar's ``extend`` for shares beyond it."""
    finite = shares[np.isfinite(shares)]
    lim = float(min(1.0, np.abs(finite).max())) if finite.size else 1.0
    lim = lim if lim > 0 else 1.0
    over, under = bool((finite > lim).any()), bool((finite < -lim).any())
    return lim, {(True, True): "both", (True, False): "max", (False, True): "min"}.get((over, under), "neither")


def attribution_figure(grid: AttributionGrid, adapter: str):
    """Small multiples, one panel per feature: module type × block, colour = share (one diverging scale)."""
    import matplotlib as mpl

    from lorascope.report._plot import new_figure

    n, rows, cols = len(grid.features), len(grid.types), len(grid.columns)
    fig = new_figure(min(9.0, max(5.0, 3.5 + 0.25 * cols)), 0.9 + n * (0.3 + 0.16 * max(rows, 2)))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    lim, extend = _share_limits(grid.shares)
    cmap = mpl.colormaps["RdBu_r"].with_extremes(bad="#e3e3e3")  # grey = no such module, white = share 0
    step = 1 if cols <= 32 else math.ceil(cols / 16)
    ticks = [j for j, c in enumerate(grid.columns) if c == OTHER or int(c) % step == 0]
    blocks = cols - (grid.columns[-1] == OTHER)
    for ax, feat, shares, rem in zip(axes, grid.features, grid.shares, grid.remainder, strict=True):
        im = ax.imshow(
            np.ma.masked_invalid(shares), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest"
        )
        ax.set_yticks(range(rows), grid.types)
        ax.set_title(f"f{feat} · remainder {_n2(rem)}", loc="left", fontsize=9)
        ax.grid(False)
        ax.tick_params(length=2, labelbottom=ax is axes[-1])
        if 0 < blocks < cols:
            ax.axvline(blocks - 0.5, color="white", lw=3)  # set the unnumbered modules' column apart
    axes[-1].set_xticks(ticks, [grid.columns[j] for j in ticks])
    axes[-1].set_xlabel("block" if blocks else "module without a block index")
    fig.colorbar(
        im,
        ax=list(axes),
        shrink=min(1.0, 3.0 / n),
        aspect=25,
        extend=extend,
        label="share of the feature's projection",
    )
    fig.suptitle(f"{adapter}: direct write of each LoRA module to each top feature", fontsize=10)
    return fig


def heatmap(csv: Path, out_dir: Path, adapter: str) -> Path | None:
    """Per-feature module type × block share heatmaps (PNG + SVG, deterministic) of one adapter's attribution
    table; None when it has no module row."""
    import pandas as pd

    from lorascope.report._plot import save

    df = pd.read_csv(csv)
    grid = attribution_grid(df) if not df.empty else None
    if grid is None or not grid.shares.size:
        return None
    return save(attribution_figure(grid, adapter), out_dir, f"attribution_{adapter}")[0]


def _img(png: Path | None, alt: str, caption: str = "") -> str:
    if png is None or not png.is_file():
        return ""
    b64 = base64.b64encode(png.read_bytes()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt='{_e(alt)}' src='data:image/png;base64,{b64}'>{cap}</figure>"


ATTRIBUTION_CAPTION = (
    "One panel per top feature: rows are the LoRA module types, columns the blocks, colour the share of the "
    "feature's projection that the module writes directly (one scale for all panels; arrows on the colour bar: "
    "shares beyond it, where modules cancel each other; grey: no such module). The panel title gives the remainder, "
    "the share left to indirect effects."
)


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
        + _img(png, f"attribution heatmap {adapter}", ATTRIBUTION_CAPTION)
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


__all__ = [
    "TITLE",
    "AttributionGrid",
    "attribution_figure",
    "attribution_grid",
    "causal_reading",
    "changed_section",
    "heatmap",
]
