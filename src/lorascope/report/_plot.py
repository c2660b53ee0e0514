"""Plot primitives shared by the figures: style, deterministic saving, and single-axes panels.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global backend switch), so they render
headless with Agg and never touch a notebook's state. SVGs carry no date and a fixed hash salt: same input,
same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from lorascope.io import atomic_path
from lorascope.report._table import Tab

# Okabe-Ito: distinguishable for colour-blind readers and in greyscale print.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
NULL_COLOR = "#888888"
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "svg.hashsalt": "lorascope",
    "svg.fonttype": "path",
    "figure.dpi": 100,
    "savefig.bbox": "tight",
    "legend.frameon": False,
    "image.cmap": "viridis",
}
PNG_DPI = 130


def new_figure(w: float, h: float) -> Figure:
    with mpl.rc_context(STYLE):
        return Figure(figsize=(w, h), layout="constrained")


def save(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` and ``name.svg`` atomically and deterministically; returns both paths."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    with mpl.rc_context(STYLE):
        with atomic_path(paths[0]) as tmp:
            fig.savefig(tmp, format="png", dpi=PNG_DPI, metadata={"Software": None})
        fig.set_layout_engine("none")  # keep the layout computed for the PNG: the SVG needs no second solve
        with atomic_path(paths[1]) as tmp:
            fig.savefig(tmp, format="svg", metadata={"Date": None, "Creator": None})
    return paths


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def yerr(stats: list) -> np.ndarray:
    """[2, n] asymmetric error-bar lengths from Stat CIs (0 where a CI is missing)."""
    lo = [max(0.0, s.value - s.lo) if s is not None and s.has_ci else 0.0 for s in stats]
    hi = [max(0.0, s.hi - s.value) if s is not None and s.has_ci else 0.0 for s in stats]
    return np.array([lo, hi])


def empty(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not measured", ha="center", va="center", color=NULL_COLOR, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def heatmap(
    ax,
    mat: np.ndarray,
    rows: list[str],
    cols: list[str],
    title: str,
    fmt: str = "{:.3g}",
    cmap: str = "viridis",
    limits: tuple[float, float] | None = None,
) -> None:
    """Annotated heatmap; NaN cells are left blank; ``limits`` = (vmin, vmax) of the colours (None: data range)."""
    vmin, vmax = limits if limits is not None else (None, None)
    m = np.ma.masked_invalid(mat)
    im = ax.imshow(m, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.grid(False)
    ax.set_title(title)
    finite = mat[np.isfinite(mat)]
    mid = (np.nanmin(finite) + np.nanmax(finite)) / 2 if finite.size else 0.0
    if vmin is not None and vmax is not None:
        mid = (vmin + vmax) / 2
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            if math.isfinite(mat[i, j]):
                ax.text(
                    j,
                    i,
                    fmt.format(mat[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if mat[i, j] < mid else "black",
                )
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


def layer_adapter_heat(ax, tab: Tab, metric: str, title: str) -> bool:
    layers, adapters = (
        tab.layers(metric),
        [a for a in tab.adapters() if any(tab.get(metric, layer, a) for layer in tab.layers(metric))],
    )
    if not layers or not adapters:
        empty(ax, title)
        return False
    mat = np.array([[tab.value(metric, layer, a) for a in adapters] for layer in layers])
    heatmap(ax, mat, [f"L{layer}" for layer in layers], [tab.label(a) for a in adapters], title)
    ax.set_xlabel("adapter (LoRA rank)")
    ax.set_ylabel("layer")
    return True


def grouped_bars(
    ax, tab: Tab, series: list[tuple[str, str]], title: str, ylabel: str, log_if_wide: bool = True
) -> bool:
    """Bars per (layer, adapter) cell, one bar per metric in ``series`` [(metric, label)], with CI error bars."""
    metrics = [m for m, _ in series]
    cells = tab.cells(*metrics)
    present = [(m, lab) for m, lab in series if any(tab.get(m, *c) for c in cells)]
    if not cells or not present:
        empty(ax, title)
        return False
    x = np.arange(len(cells))
    width = 0.8 / len(present)
    allv = []
    for i, (m, lab) in enumerate(present):
        stats = [tab.get(m, *c) for c in cells]
        vals = np.array([s.value if s is not None else np.nan for s in stats])
        allv += [v for v in vals if np.isfinite(v) and v > 0]
        is_null = m in ("fvu_noise",)
        ax.bar(
            x + (i - (len(present) - 1) / 2) * width,
            vals,
            width,
            yerr=yerr(stats),
            capsize=2,
            label=lab,
            color=NULL_COLOR if is_null else color(i),
            hatch="//" if is_null else None,
            edgecolor="white",
            linewidth=0.5,
            error_kw={"elinewidth": 0.8},
        )
    ax.set_xticks(x, [f"L{layer}\n{tab.label(a)}" for layer, a in cells])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_if_wide and allv and max(allv) / min(allv) > 20:
        ax.set_yscale("log")
    ax.legend(ncols=min(len(present), 3), loc="upper left", bbox_to_anchor=(0, -0.18))
    return True


def vs_rank(ax, tab: Tab, metric: str, title: str, ylabel: str, logy: bool = False, ref: str | None = None) -> bool:
    """One line per layer: ``metric`` against adapters ordered by rank (categorical x), CI as error bars.

    ``ref``: optional second metric drawn dashed in the same colour (e.g. the reference SAE's L0)."""
    layers = tab.layers(metric)
    adapters = [a for a in tab.adapters() if any(tab.get(metric, layer, a) for layer in layers)]
    if not layers or not adapters:
        empty(ax, title)
        return False
    x = np.arange(len(adapters))
    for i, layer in enumerate(layers):
        stats = [tab.get(metric, layer, a) for a in adapters]
        vals = [s.value if s is not None else np.nan for s in stats]
        ax.errorbar(x, vals, yerr=yerr(stats), marker="o", ms=4, capsize=2, color=color(i), label=f"L{layer}")
        if ref and tab.has(ref):
            rv = [tab.value(ref, layer, a) for a in adapters]
            ax.plot(x, rv, ls="--", marker=".", color=color(i), alpha=0.7, label=f"L{layer} ref" if i == 0 else None)
    ax.set_xticks(x, [tab.label(a) for a in adapters])
    ax.set_xlabel("adapter (LoRA rank)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    return True


def mmcs_panel(ax, tab: Tab, title: str = "MMCS adapter → reference") -> bool:
    """MMCS bars per cell with the random-dictionary null (×) and seed-vs-seed ceiling (▲) marked."""
    cells = tab.cells("mmcs_adapter_to_ref")
    if not cells:
        empty(ax, title)
        return False
    x = np.arange(len(cells))
    stats = [tab.get("mmcs_adapter_to_ref", *c) for c in cells]
    ax.bar(x, [s.value for s in stats], 0.6, yerr=yerr(stats), capsize=2, color=color(0), label="adapter → ref")
    nulls = [s.null for s in stats]
    if any(np.isfinite(nulls)):
        ax.scatter(x, nulls, marker="x", color="black", zorder=3, label="random-dictionary null")
    seed = [tab.value("mmcs_seed_vs_seed", *c) for c in cells]
    if any(np.isfinite(seed)):
        ax.scatter(x, seed, marker="^", color=color(3), zorder=3, label="seed-vs-seed ceiling")
    ax.set_xticks(x, [f"L{layer}\n{tab.label(a)}" for layer, a in cells])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean max cosine")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.18), ncols=3)
    return True
