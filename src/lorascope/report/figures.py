"""The report's figures, each written as PNG + SVG.

Every figure function has the signature ``fig(df, out_dir, arrays=None) -> list[Path]``: ``df`` is the tidy
results table, ``arrays`` the per-(layer, adapter) npz contents (see lorascope.results_schema). A figure whose data is
absent returns ``[]`` and writes nothing. :data:`FIGURES` lists them in report order with a caption that says how
to read each one and what its null is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.lines import Line2D

from lorascope import results_schema as schema
from lorascope.report import _plot as P
from lorascope.report._table import Tab
from lorascope.report.run import load_run, normalize_frame

Arrays = dict[tuple[int, str], dict[str, np.ndarray]]

FVU_SERIES = [
    (schema.FVU_ADAPTER_SAE, "adapter SAE"),
    (schema.FVU_REF_ON_DELTA, "reference SAE on Δ"),
    (schema.FVU_REF_DIFF, "ref: SAE(h_ft) − SAE(h_base)"),
    (schema.FVU_REF_LSTSQ_ACTIVE, "ref: lstsq on active atoms"),
    (schema.FVU_NOISE, "isotropic noise (sanity floor)"),
]
KL_SERIES = [
    (schema.KL_RECOVERED_REL_ADAPTER_SAE, "adapter SAE Δ̂ (beyond Δ̂ = 0)"),
    (schema.KL_RECOVERED_REL_REF_DIFF, "ref: SAE(h_ft) − SAE(h_base) (beyond Δ̂ = 0)"),
]


def _tab(df) -> Tab:
    """The lookup index of a results table; :func:`render_figures` builds it once and passes it as ``df``."""
    return df if isinstance(df, Tab) else Tab(normalize_frame(df))


def delta_norms(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """Layer × adapter heatmaps of mean ‖Δ‖ and mean ‖Δ‖/‖h_base‖."""
    tab = _tab(df)
    if not tab.has(schema.DELTA_NORM_MEAN, schema.REL_DELTA_NORM_MEAN):
        return []
    fig = P.new_figure(10, 0.6 * len(tab.layers()) + 2.2)
    a1, a2 = fig.subplots(1, 2)
    P.layer_adapter_heat(a1, tab, schema.DELTA_NORM_MEAN, "mean ‖Δ‖ per token")
    P.layer_adapter_heat(a2, tab, schema.REL_DELTA_NORM_MEAN, "mean ‖Δ‖ / ‖h_base‖")
    return P.save(fig, out_dir, "delta_norms")


def reconstruction_fvu(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """FVU on held-out Δ: adapter SAE, reference SAE and the controls, grouped per layer × adapter, with CIs."""
    tab = _tab(df)
    if not tab.has(schema.FVU_ADAPTER_SAE, schema.FVU_REF_ON_DELTA):
        return []
    n = len(tab.cells(*[m for m, _ in FVU_SERIES]))
    fig = P.new_figure(max(7.0, 1.4 * n + 2), 4.2)
    P.grouped_bars(
        fig.subplots(),
        tab,
        FVU_SERIES,
        "Reconstruction of held-out Δ (lower is better)",
        "FVU (fraction of variance unexplained)",
    )
    return P.save(fig, out_dir, "reconstruction_fvu")


def reconstruction_improvement(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """Improvement % of the adapter SAE's FVU over the reference SAE's, against LoRA rank, one line per layer."""
    tab = _tab(df)
    if not tab.has(schema.RECON_IMPROVEMENT_PCT):
        return []
    fig = P.new_figure(5.5, 3.6)
    ax = fig.subplots()
    P.vs_rank(ax, tab, schema.RECON_IMPROVEMENT_PCT, "FVU improvement of adapter SAE over reference", "improvement (%)")
    ax.axhline(0, color=P.NULL_COLOR, lw=1)
    return P.save(fig, out_dir, "reconstruction_improvement")


def feature_density(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """L0 and alive latents of the adapter SAE against rank, one line per layer (reference SAE's L0 dashed)."""
    tab = _tab(df)
    if not tab.has(schema.L0_ADAPTER_SAE, schema.ALIVE_LATENTS_ADAPTER_SAE):
        return []
    fig = P.new_figure(10, 3.6)
    a1, a2 = fig.subplots(1, 2)
    P.vs_rank(
        a1, tab, schema.L0_ADAPTER_SAE, "L0 on held-out Δ", "active latents per token", ref=schema.L0_REF_ON_DELTA
    )
    P.vs_rank(a2, tab, schema.ALIVE_LATENTS_ADAPTER_SAE, "Alive latents", "latents firing at least once")
    return P.save(fig, out_dir, "feature_density")


def density_histograms(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """Histograms of log10 feature density per layer (adapter SAE solid, reference SAE on Δ dotted)."""
    tab = _tab(df)
    arrays = arrays or {}
    keys = sorted((k for k, v in arrays.items() if "density_adapter" in v), key=lambda k: (k[0], tab.rank(k[1])))
    if not keys:
        return []
    layers = sorted({k[0] for k in keys})
    fig = P.new_figure(4.2 * len(layers), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    bins = np.linspace(-6, 0, 49)
    for ax, layer in zip(axes, layers, strict=True):
        for i, (lay, a) in enumerate(k for k in keys if k[0] == layer):
            dens = np.asarray(arrays[(lay, a)]["density_adapter"], dtype=np.float64)
            alive = dens[dens > 0]
            ax.hist(
                np.log10(alive),
                bins=bins,
                histtype="step",
                lw=1.4,
                color=P.color(i),
                label=f"{tab.label(a)} ({(dens <= 0).sum()} dead)",
            )
            ref = arrays[(lay, a)].get("density_ref_on_delta")
            if ref is not None and (ref > 0).any():
                ax.hist(
                    np.log10(ref[ref > 0]),
                    bins=bins,
                    histtype="step",
                    ls=":",
                    color=P.color(i),
                    label=f"{tab.label(a)} ref SAE on Δ",
                )
        ax.set_title(f"Layer {layer}: feature density")
        ax.set_xlabel("log10(fraction of tokens a latent fires on)")
        ax.set_ylabel("latents")
        ax.legend()
    return P.save(fig, out_dir, "density_histograms")


def feature_overlap(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """Overlap@τ curves (fraction of adapter atoms with best reference match ≥ τ) and MMCS with null and ceiling."""
    tab = _tab(df)
    over = sorted(tab.metrics(schema.OVERLAP_ADAPTER_TO_REF), key=schema.overlap_tau)
    if not over and not tab.has(schema.MMCS_ADAPTER_TO_REF):
        return []
    fig = P.new_figure(11, 3.9)
    a1, a2 = fig.subplots(1, 2)
    if over:
        taus = [float(m.split("@")[1]) for m in over]
        adapters = tab.adapters()
        for layer, a in tab.cells(*over):
            stats = [tab.get(m, layer, a) for m in over]
            ls = ["-", "--", ":", "-."][tab.layers(*over).index(layer) % 4]
            a1.errorbar(
                taus,
                [s.value if s else np.nan for s in stats],
                yerr=P.yerr(stats),
                marker="o",
                ms=3,
                capsize=2,
                ls=ls,
                color=P.color(adapters.index(a)),
                label=f"L{layer} {tab.label(a)}",
            )
        a1.set_xlabel("cosine threshold τ")
        a1.set_ylabel("fraction of adapter atoms with best match ≥ τ")
        a1.set_ylim(0, 1.02)
        a1.set_title("Feature overlap with the reference dictionary")
        a1.legend()
    else:
        P.empty(a1, "Feature overlap with the reference dictionary")
    P.mmcs_panel(a2, tab)
    return P.save(fig, out_dir, "feature_overlap")


def best_match_cosines(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """Per layer × adapter: histograms of each adapter atom's best cosine to the reference, the null and seed."""
    tab = _tab(df)
    arrays = arrays or {}
    keys = [k for k in arrays if "best_cos_adapter_to_ref" in arrays[k]]
    if not keys:
        return []
    layers = sorted({k[0] for k in keys})
    adapters = [a for a in tab.adapters() if any(k[1] == a for k in keys)]
    adapters += sorted({k[1] for k in keys} - set(adapters))
    fig = P.new_figure(3.4 * len(adapters) + 0.5, 2.6 * len(layers) + 0.5)
    axes = np.array(fig.subplots(len(layers), len(adapters), squeeze=False, sharex=True))
    bins = np.linspace(-0.05, 1.0, 43)
    series = [
        ("best_cos_adapter_to_ref", "adapter → reference", P.color(0)),
        ("best_cos_null", "null: random dictionary", P.NULL_COLOR),
        ("best_cos_seed", "ceiling: other seed", P.color(3)),
    ]
    for i, layer in enumerate(layers):
        for j, a in enumerate(adapters):
            ax, arr = axes[i, j], arrays.get((layer, a))
            if arr is None:
                P.empty(ax, f"L{layer} {tab.label(a)}")
                continue
            for key, lab, col in series:
                if key in arr:
                    ax.hist(
                        np.asarray(arr[key], dtype=np.float64),
                        bins=bins,
                        histtype="stepfilled",
                        alpha=0.45,
                        color=col,
                        label=lab,
                        density=True,
                    )
            ax.set_title(f"L{layer} {tab.label(a)}")
            if i == len(layers) - 1:
                ax.set_xlabel("best-match cosine")
            if i == 0 and j == 0:
                ax.legend(loc="upper left")
    return P.save(fig, out_dir, "best_match_cosines")


def _kd_null(tab: Tab, name: str, layer: int, adapter: str, k: int) -> float:
    s = tab.get(f"mean_cos2_{name}", layer, adapter)
    if s is not None and np.isfinite(s.null):
        return s.null
    if name != schema.PCA_DELTA_VS_LORA_COLSPACE:  # atoms selected on Δ: k/d is no null (see selected_cos2_*)
        return float("nan")
    d = next((st.d for m in tab.metrics(schema.MEAN_COS2) if (st := tab.get(m, layer, adapter)) and st.d > 0), 0)
    return k / d if d else float("nan")


def principal_angles(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """cos² of principal angles (largest first) between rank-k subspaces, with the random k/d null line."""
    tab = _tab(df)
    arrays = arrays or {}
    items = sorted(
        (
            (layer, a, key[len("principal_angles_") :])
            for (layer, a), arr in arrays.items()
            for key in arr
            if key.startswith("principal_angles_")
        ),
        key=lambda t: (t[0], tab.rank(t[1]), t[2]),
    )
    if not items:
        return []
    layers = sorted({t[0] for t in items})
    names = sorted({t[2] for t in items})
    styles = {n: ["-", "--", ":", "-."][i % 4] for i, n in enumerate(names)}
    adapters = tab.adapters()
    shown = sorted({t[1] for t in items}, key=tab.rank)
    fig = P.new_figure(4.2 * len(layers), 3.4 + 0.2 * (len(shown) + len(names)))
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    for ax, layer in zip(axes, layers, strict=True):
        nulls = set()
        for layer2, a, name in (t for t in items if t[0] == layer):
            ang = np.sort(np.asarray(arrays[(layer2, a)][f"principal_angles_{name}"], dtype=np.float64))
            c2 = np.cos(ang) ** 2
            ci = adapters.index(a) if a in adapters else 0
            ax.plot(np.arange(1, len(c2) + 1), c2, marker="o", ms=3, color=P.color(ci), ls=styles[name])
            null = _kd_null(tab, name, layer, a, len(c2))
            if np.isfinite(null) and round(null, 6) not in nulls:
                nulls.add(round(null, 6))
                ax.axhline(null, color=P.NULL_COLOR, ls="--", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("principal angle index (smallest angle first)")
        ax.set_ylabel("cos² θᵢ")
        ax.set_title(f"Layer {layer}: principal angles")
    # one legend for all panels, below them: colour = adapter, line style = which subspaces (a legend per panel
    # with every adapter × comparison did not fit: the layout engine collapsed the axes)
    handles = [
        Line2D([], [], color=P.color(adapters.index(a) if a in adapters else 0), marker="o", ms=3) for a in shown
    ]
    handles += [Line2D([], [], color="0.3", ls=styles[n]) for n in names]
    labels = [tab.label(a) for a in shown] + [n.replace("_", " ") for n in names]
    handles.append(Line2D([], [], color=P.NULL_COLOR, ls="--", lw=1))
    labels.append("random null k/d (k: subspace size)")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=7)
    return P.save(fig, out_dir, "principal_angles")


def cka(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """Per layer: adapter × adapter linear CKA of Δ on the same held-out tokens (diagonal = 1)."""
    tab = _tab(df)
    pref = schema.CKA_DELTA_VS
    ms = tab.metrics(pref)
    if not ms:
        return []
    layers = tab.layers(*ms)
    fig = P.new_figure(4.3 * len(layers), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    for ax, layer in zip(axes, layers, strict=True):
        names = {a for _, a in tab.cells(*ms) if _ == layer} | {
            m[len(pref) :] for m in ms if any(tab.get(m, layer, a) for a in tab.adapters())
        }
        order = [a for a in tab.adapters() if a in names] + sorted(names - set(tab.adapters()))
        mat = np.full((len(order), len(order)), np.nan)
        for i, a in enumerate(order):
            mat[i, i] = 1.0
            for j, b in enumerate(order):
                if i != j:
                    v = tab.value(pref + b, layer, a)
                    mat[i, j] = v if np.isfinite(v) else tab.value(pref + a, layer, b)
        labels = [tab.label(a) for a in order]
        P.heatmap(ax, mat, labels, labels, f"Layer {layer}: CKA of Δ", fmt="{:.2f}", limits=(0, 1))
    return P.save(fig, out_dir, "cka")


def splice_kl(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """Fraction of KL(adapted ‖ base) recovered when Δ is replaced by a reconstruction, per layer × adapter."""
    tab = _tab(df)
    if not tab.has(*[m for m, _ in KL_SERIES]):
        return []
    n = len(tab.cells(*[m for m, _ in KL_SERIES]))
    fig = P.new_figure(max(6.0, 1.2 * n + 2), 3.8)
    ax = fig.subplots()
    P.grouped_bars(
        ax,
        tab,
        KL_SERIES,
        "Splice: KL recovered beyond Δ̂ = 0 (1 = adapter kept, 0 = as Δ̂ = 0)",
        "fraction of KL",
        log_if_wide=False,
    )
    ax.axhline(1.0, color=P.NULL_COLOR, ls="--", lw=1)
    ax.axhline(0.0, color=P.NULL_COLOR, lw=1)
    return P.save(fig, out_dir, "splice_kl")


def summary(df, out_dir: str | Path, arrays: Arrays | None = None) -> list[Path]:
    """One page, 2 × 3 panels: relative Δ norm, FVU, improvement vs rank, L0 vs rank, MMCS, KL recovered."""
    tab = _tab(df)
    fig = P.new_figure(15, 8.5)
    ax = fig.subplots(2, 3)
    drew = [
        P.layer_adapter_heat(ax[0, 0], tab, schema.REL_DELTA_NORM_MEAN, "‖Δ‖ / ‖h_base‖"),
        P.grouped_bars(ax[0, 1], tab, [FVU_SERIES[0], FVU_SERIES[1], FVU_SERIES[4]], "FVU on held-out Δ", "FVU"),
        P.vs_rank(ax[0, 2], tab, schema.RECON_IMPROVEMENT_PCT, "FVU improvement over reference", "%"),
        P.vs_rank(ax[1, 0], tab, schema.L0_ADAPTER_SAE, "Adapter SAE L0", "active latents / token"),
        P.mmcs_panel(ax[1, 1], tab),
        P.grouped_bars(ax[1, 2], tab, KL_SERIES, "KL recovered beyond Δ̂ = 0", "fraction", log_if_wide=False),
    ]
    if not any(drew):
        return []
    fig.suptitle("lorascope summary", fontsize=12)
    return P.save(fig, out_dir, "summary")


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    caption: str
    make: Callable[..., list[Path]]


FIGURES: list[FigureSpec] = [
    FigureSpec("summary", "Summary", "The key panels on one page; each is explained in its own figure below.", summary),
    FigureSpec(
        "delta_norms",
        "How large is the adapter's change?",
        "Mean per-token norm of Δ = h_adapted − h_base (left) and relative to the base residual norm (right), "
        "per layer (rows) and adapter (columns). There is no null: Δ is exactly 0 without an adapter.",
        delta_norms,
    ),
    FigureSpec(
        "reconstruction_fvu",
        "Reconstruction of held-out Δ",
        "FVU = Σ‖Δ − Δ̂‖² / Σ‖Δ − mean Δ‖² (lower is better; 1 = no better than predicting the mean). Bars: the "
        "adapter SAE, the reference SAE applied to Δ, and controls (reference SAE on h_ft minus on h_base; "
        "least squares on the reference atoms active on h_ft). The null is FVU = 1 (the mean predictor); the "
        "verdict uses the paired gap to the better of the two controls. Hatched grey: isotropic noise at "
        "matched norm (FVU ≈ 2, a sanity floor). Error bars: 95% CIs resampling held-out documents.",
        reconstruction_fvu,
    ),
    FigureSpec(
        "reconstruction_improvement",
        "Improvement over the reference SAE",
        "100·(FVU_ref − FVU_adapter)/FVU_ref against LoRA rank, one line per layer, with the reference SAE "
        "fed Δ — the weakest control, shown for continuity only (the findings use the best control). 0 (grey) "
        "= no gain.",
        reconstruction_improvement,
    ),
    FigureSpec(
        "feature_density",
        "Sparsity of the adapter SAE",
        "Left: L0 (mean active latents per held-out token) against rank; dashed = the reference SAE on the "
        "same Δ. Right: latents that fire at least once. Read the trend along each line.",
        feature_density,
    ),
    FigureSpec(
        "density_histograms",
        "Feature density distributions",
        "Histogram of log10 firing frequency of each adapter-SAE latent (solid) and reference-SAE latent on Δ "
        "(dotted). Dead latents (never fire) are counted in the legend, not drawn.",
        density_histograms,
    ),
    FigureSpec(
        "feature_overlap",
        "Does the adapter SAE find reference features?",
        "Left: fraction of adapter atoms whose best cosine to any reference atom is ≥ τ. Right: MMCS (mean over "
        "adapter atoms of the best cosine, alive atoms of both); × = the strongest null (the largest of a "
        "random isotropic dictionary, random atoms with Δ's training covariance and the SAE at "
        "initialisation), ▲ = a second adapter SAE trained with another seed (the ceiling, same alive "
        "atoms).",
        feature_overlap,
    ),
    FigureSpec(
        "best_match_cosines",
        "Best-match cosine distributions",
        "Per adapter atom, its best cosine to the reference dictionary (blue) against the same statistic for a "
        "random dictionary (grey, the null) and for the other-seed adapter SAE (the ceiling). Mass to the "
        "right of the grey = alignment beyond chance.",
        best_match_cosines,
    ),
    FigureSpec(
        "principal_angles",
        "Subspace alignment",
        "cos² of the principal angles between rank-k subspaces (e.g. top PCA directions of Δ vs the reference "
        "SAE's top-k atoms). 1 = shared direction. Dashed grey: k/d, the expected mean cos² for random "
        "subspaces — drawn only for the LoRA column space: atoms selected by their energy on Δ beat k/d by "
        "construction (their selection-aware null is in the table, selected_cos2_*).",
        principal_angles,
    ),
    FigureSpec(
        "cka",
        "Do different adapters change the same directions?",
        "Debiased linear CKA between the Δ of two adapters on the same held-out tokens (1 = same geometry up "
        "to rotation and scale, ≈ 0 = unrelated; the table holds each pair's document-permutation null and "
        "p-value). Diagonal is 1 by definition.",
        cka,
    ),
    FigureSpec(
        "splice_kl",
        "Does the reconstruction keep the adapter's behaviour?",
        "h_base + Δ̂ is spliced at one layer into the adapted forward pass (the adapter keeps acting after "
        "it, so Δ̂ = 0 alone already recovers part of the KL); bars show 1 − KL(adapted‖spliced)/"
        "KL(adapted‖spliced with Δ̂ = 0): 1 = behaviour fully kept, 0 = no better than splicing nothing (the "
        "null). Intervals resample documents.",
        splice_kl,
    ),
]


def render_figures(
    df, out_dir: str | Path, arrays: Arrays | None = None, run_dir: str | Path | None = None
) -> dict[str, list[Path]]:
    """Run every figure in :data:`FIGURES`; returns name -> written paths in :data:`FIGURES` order (figures
    without data are omitted).

    With ``run_dir`` (the run folder ``df`` and ``arrays`` were read from) and two or more CPU cores, a second
    process reads the run folder itself and draws figures too, both taking the next undrawn figure from one queue:
    matplotlib draws in Python on one core, and the report's figures took ~26 s of the quickstart's 30-s report
    stage. Every figure is drawn by the same function either way, so the files are the same bytes."""
    tab = _tab(df)  # indexed once for all figures (each figure also accepts a plain DataFrame)
    made: dict[str, list[Path]] = {}
    helper = _FigureHelper.start(run_dir, out_dir) if run_dir is not None and _cores() >= 2 else None
    for spec in _take(helper.todo if helper else None, FIGURES):
        made[spec.name] = spec.make(tab, out_dir, arrays)
    if helper is not None:
        for name, paths in helper.finish().items():
            made[name] = paths
        for spec in FIGURES:  # anything the helper could not draw (it failed): drawn here
            if spec.name not in made:
                made[spec.name] = spec.make(tab, out_dir, arrays)
    return {s.name: made[s.name] for s in FIGURES if made.get(s.name)}


def _cores() -> int:
    from lorascope._spawn import cpu_cores

    return cpu_cores()


def _take(todo, specs: list[FigureSpec]):
    """The figures this process draws: all of them, or the next name from the shared queue ``todo`` until it is
    empty."""
    if todo is None:
        yield from specs
        return
    import queue

    by_name = {s.name: s for s in specs}
    while True:
        try:
            yield by_name[todo.get_nowait()]
        except queue.Empty:
            return


@dataclass
class _FigureHelper:
    """A spawned process drawing figures from the shared queue ``todo``; ``done`` receives (name, paths) per figure
    and None when it stops."""

    process: Any
    todo: Any
    done: Any

    @classmethod
    def start(cls, run_dir: str | Path, out_dir: str | Path) -> _FigureHelper:
        from lorascope._spawn import spawned

        with spawned() as ctx:
            todo, done = ctx.Queue(), ctx.Queue()
            for spec in FIGURES:
                todo.put(spec.name)
            proc = ctx.Process(target=_draw_from_queue, args=(str(run_dir), str(out_dir), todo, done), daemon=True)
            proc.start()
        return cls(proc, todo, done)

    def finish(self) -> dict[str, list[Path]]:
        """What the helper drew ({} if it failed before drawing); waits for it to stop."""
        import queue

        got: dict[str, list[Path]] = {}
        while True:
            try:
                item = self.done.get(timeout=1.0)
            except queue.Empty:
                if self.process.is_alive():
                    continue
                break  # it died without its end marker: what it did not report is drawn again here
            if item is None:
                break
            got[item[0]] = [Path(p) for p in item[1]]
        self.process.join()
        return got


def _draw_from_queue(run_dir: str, out_dir: str, todo, done) -> None:
    """The helper process: read the run folder, draw queued figures until none is left."""
    try:
        run = load_run(run_dir)
        tab = _tab(run.df)
        for spec in _take(todo, FIGURES):
            done.put((spec.name, [str(p) for p in spec.make(tab, out_dir, run.arrays)]))
    finally:
        done.put(None)


def make_all_figures(run_dir: str | Path) -> list[Path]:
    """Write every figure of a run folder into ``run_dir/figures``; returns the PNG and SVG paths."""
    run = load_run(run_dir)
    made = render_figures(run.df, Path(run_dir) / "figures", run.arrays)
    return [p for paths in made.values() for p in paths]


__all__: list[Any] = [
    "FIGURES",
    "FigureSpec",
    "make_all_figures",
    "render_figures",
    "delta_norms",
    "reconstruction_fvu",
    "reconstruction_improvement",
    "feature_density",
    "density_histograms",
    "feature_overlap",
    "best_match_cosines",
    "principal_angles",
    "cka",
    "splice_kl",
    "summary",
]
