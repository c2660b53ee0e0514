"""The study's claims as findings: numbers, CIs and nulls from the results table, and a verdict from a stated rule.

Verdict rules (each finding's ``rule`` field repeats its own):
- a per-cell test is applied at every (layer, adapter) cell (or layer, for trends) that has the data;
  ``holds`` if it passes everywhere, ``does not hold`` if it passes nowhere, ``mixed`` otherwise, and
  ``not measured`` if no cell has the data.
- "better/above" comparisons use CIs when present: A beats B only if A's CI lies entirely beyond B's
  (point estimates stand in for missing CIs).
- trends against rank use the sign of the Spearman correlation across the adapters of known rank, per layer
  (at least two distinct ranks); a tie (ρ undefined) counts as no rise.
The headline numbers quote the deepest layer and the largest rank that have the data.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lorascope import results_schema as schema
from lorascope.report._table import Stat, Tab
from lorascope.report.run import normalize_frame

HOLDS, NOT_HOLDS, MIXED, NOT_MEASURED = "holds", "does not hold", "mixed", "not measured"


@dataclass
class Finding:
    """One claim: ``verdict`` is one of holds / does not hold / mixed / not measured."""

    key: str
    title: str
    verdict: str
    text: str
    rule: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(passes: list[bool]) -> str:
    if not passes:
        return NOT_MEASURED
    return HOLDS if all(passes) else NOT_HOLDS if not any(passes) else MIXED


def _f(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _ci(s: Stat | None) -> str:
    return f" [{_f(s.lo)}, {_f(s.hi)}]" if s is not None and s.has_ci else ""


def _where(tab: Tab, layer: int, adapter: str) -> str:
    r = tab.rank(adapter)
    return f"layer {layer}, rank {r}" if r >= 0 else f"layer {layer}, adapter {adapter}"


def _count(passes: list[bool], what: str) -> str:
    return f"{sum(passes)}/{len(passes)} {what}"


def reconstruction_finding(tab: Tab) -> Finding:
    title = "Adapter SAE reconstructs Δ better than the reference SAE"
    rule = ("holds at a layer×adapter cell if the CI upper bound of the adapter SAE's FVU is below the CI lower bound "
            "of the reference SAE's FVU on the same held-out Δ; holds overall if at every cell")
    cells = [c for c in tab.cells(schema.FVU_ADAPTER_SAE) if tab.get(schema.FVU_REF_ON_DELTA, *c)]
    if not cells:
        return Finding("reconstruction", title, NOT_MEASURED, "FVU of adapter and reference SAEs not in the table.",
                       rule)
    passes = [tab.get(schema.FVU_ADAPTER_SAE, *c).upper() < tab.get(schema.FVU_REF_ON_DELTA, *c).lower()
              for c in cells]
    c = cells[-1]
    a, r = tab.get(schema.FVU_ADAPTER_SAE, *c), tab.get(schema.FVU_REF_ON_DELTA, *c)
    imp = tab.value(schema.RECON_IMPROVEMENT_PCT, *c)
    imp = imp if math.isfinite(imp) else 100 * (r.value - a.value) / r.value if r.value else math.nan
    ctrl = {m: tab.value(m, *c) for m in (schema.FVU_REF_DIFF, schema.FVU_REF_LSTSQ_ACTIVE, schema.FVU_NOISE)}
    names = {schema.FVU_REF_DIFF: "SAE(h_ft)−SAE(h_base)", schema.FVU_REF_LSTSQ_ACTIVE: "lstsq on active ref atoms",
             schema.FVU_NOISE: "noise null"}
    ctrl_txt = ", ".join(f"{names[m]} {_f(v)}" for m, v in ctrl.items() if math.isfinite(v))
    text = (f"FVU {_f(a.value)}{_ci(a)} for the adapter SAE vs {_f(r.value)}{_ci(r)} for the reference SAE "
            f"(improvement {_f(imp)}%, {_where(tab, *c)})" + (f"; controls: {ctrl_txt}" if ctrl_txt else "")
            + f". Better at {_count(passes, 'cells')}.")
    nums = {schema.FVU_ADAPTER_SAE: a.value, schema.FVU_REF_ON_DELTA: r.value, "improvement_pct": imp, **ctrl,
            "layer": c[0], "adapter": c[1], "cells": len(cells), "cells_passing": int(sum(passes))}
    return Finding("reconstruction", title, _verdict(passes), text, rule, nums)


def alignment_finding(tab: Tab) -> Finding:
    title = "Weak alignment between adapter SAE and reference dictionary"
    rule = ("alignment at a cell is weak if MMCS(adapter→reference) is below the midpoint between the "
            "random-dictionary null and the seed-vs-seed ceiling (ceiling 1 when no second seed was trained); "
            "holds if weak at every cell")
    cells = tab.cells(schema.MMCS_ADAPTER_TO_REF)
    if not cells:
        return Finding("alignment", title, NOT_MEASURED, "MMCS adapter→reference not in the table.", rule)
    passes, above = [], []
    for c in cells:
        s = tab.get(schema.MMCS_ADAPTER_TO_REF, *c)
        null = s.null if math.isfinite(s.null) else 0.0
        ceil = tab.value(schema.MMCS_SEED_VS_SEED, *c)
        ceil = ceil if math.isfinite(ceil) else 1.0
        passes.append(s.value < (null + ceil) / 2)
        above.append(s.lower() > null)
    c = cells[-1]
    s = tab.get(schema.MMCS_ADAPTER_TO_REF, *c)
    ceil = tab.value(schema.MMCS_SEED_VS_SEED, *c)
    ceil_txt = f"seed-vs-seed ceiling {_f(ceil)}" if math.isfinite(ceil) else "no seed-vs-seed ceiling (1 assumed)"
    text = (f"MMCS(adapter→reference) {_f(s.value)}{_ci(s)} vs random-dictionary null {_f(s.null)} and {ceil_txt} "
            f"({_where(tab, *c)}). Weak at {_count(passes, 'cells')}; above the null at {_count(above, 'cells')}.")
    nums = {"mmcs": s.value, "ci_low": s.lo, "ci_high": s.hi, "null": s.null, "ceiling": ceil, "layer": c[0],
            "adapter": c[1], "cells": len(cells), "cells_weak": int(sum(passes)), "cells_above_null": int(sum(above))}
    return Finding("alignment", title, _verdict(passes), text, rule, nums)


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr(x, y).statistic
    return float(rho)


def trend_finding(tab: Tab, key: str, metric: str, title: str, what: str) -> Finding:
    """``metric`` rises with LoRA rank: Spearman ρ > 0 across ranks, per layer."""
    rule = (f"per layer, Spearman correlation between LoRA rank and {what} across adapters of known rank (≥ 2 distinct "
            "ranks); rises at a layer if ρ > 0; holds if it rises at every layer")
    per_layer: dict[int, list[tuple[int, float]]] = {}
    for layer, a in tab.cells(metric):
        v, r = tab.value(metric, layer, a), tab.rank(a)
        if r >= 0 and math.isfinite(v):
            per_layer.setdefault(layer, []).append((r, v))
    per_layer = {k: sorted(v) for k, v in per_layer.items() if len({r for r, _ in v}) >= 2}
    if not per_layer:
        return Finding(key, title, NOT_MEASURED, f"{what} at two or more ranks not in the table.", rule)
    rhos = {layer: _spearman([r for r, _ in pts], [v for _, v in pts]) for layer, pts in per_layer.items()}
    passes = [bool(rho > 0) for rho in rhos.values()]  # NaN > 0 is False
    layer = max(per_layer)
    pts = per_layer[layer]
    text = (f"{what} {_f(pts[0][1])}→{_f(pts[-1][1])} from rank {pts[0][0]} to {pts[-1][0]} at layer {layer} "
            f"(Spearman ρ {_f(rhos[layer])}); rises at {_count(passes, 'layers')}.")
    nums = {"layer": layer, "rank_low": pts[0][0], "rank_high": pts[-1][0], "value_low": pts[0][1],
            "value_high": pts[-1][1], "spearman_by_layer": {str(k): v for k, v in rhos.items()},
            "layers": len(passes), "layers_passing": int(sum(passes))}
    return Finding(key, title, _verdict(passes), text, rule, nums)


def free_l0_density(tab: Tab) -> tuple[str, str] | None:
    """(metric, label) of the density stage's free-L0 SAE L0 when the table has it (else None): L0 at the fixed
    coefficient, labelled with the SAE and coefficient its rows' note names (e.g. "paper_a, λ=0.2")."""
    if not tab.cells(schema.L0_FIXED_COEFFICIENT):
        return None
    notes = tab.df.loc[tab.df.metric == schema.L0_FIXED_COEFFICIENT, "note"] if "note" in tab.df else []
    notes = sorted({str(n) for n in notes if isinstance(n, str) and n})
    return schema.L0_FIXED_COEFFICIENT, "L0 of the free-L0 SAE" + (f" ({'; '.join(notes)})" if notes else "")


def density_depth_finding(tab: Tab) -> Finding | None:
    """The free-L0 SAE's L0 rises with depth: per adapter, Spearman ρ between layer and L0 > 0 (None without
    free-L0 rows: a TopK L0 says nothing about depth)."""
    picked = free_l0_density(tab)
    if picked is None:
        return None
    metric, what = picked
    title = "Feature density rises with depth"
    rule = (f"per adapter, Spearman correlation between layer and {what} across ≥ 2 layers; rises for an adapter if "
            "ρ > 0; holds if it rises for every adapter")
    per_adapter: dict[str, list[tuple[int, float]]] = {}
    for layer, a in tab.cells(metric):
        if math.isfinite(tab.value(metric, layer, a)):
            per_adapter.setdefault(a, []).append((layer, tab.value(metric, layer, a)))
    per_adapter = {a: sorted(v) for a, v in per_adapter.items() if len(v) >= 2}
    if not per_adapter:
        return Finding("density_depth", title, NOT_MEASURED, f"{what} at two or more layers not in the table.", rule)
    rhos = {a: _spearman([x for x, _ in v], [y for _, y in v]) for a, v in per_adapter.items()}
    passes = [bool(r > 0) for r in rhos.values()]
    a = max(per_adapter, key=tab.rank)
    pts = per_adapter[a]
    at = f"rank {tab.rank(a)}" if tab.rank(a) >= 0 else f"adapter {a}"
    text = (f"{what} {_f(pts[0][1])}→{_f(pts[-1][1])} from layer {pts[0][0]} to {pts[-1][0]} at {at} "
            f"(Spearman ρ {_f(rhos[a])}); rises for {_count(passes, 'adapters')}.")
    nums = {"adapter": a, "metric": metric, "spearman_by_adapter": rhos, "adapters": len(passes),
            "adapters_passing": int(sum(passes))}
    return Finding("density_depth", title, _verdict(passes), text, rule, nums)


def density_finding(tab: Tab) -> Finding:
    """L0 rises with rank: the free-L0 SAE's L0 when the density stage ran; otherwise the adapter SAE's L0, or,
    when the architecture fixes L0 (TopK: L0 = k everywhere), its alive latents."""
    title = "Feature density rises with rank"
    picked = free_l0_density(tab)
    if picked is not None:
        f = trend_finding(tab, "density_rank", picked[0], title, picked[1])
        return dataclasses.replace(f, numbers={**f.numbers, "metric": picked[0]})
    l0 = [tab.value(schema.L0_ADAPTER_SAE, *c) for c in tab.cells(schema.L0_ADAPTER_SAE)]
    l0 = [v for v in l0 if math.isfinite(v)]
    if len(l0) > 1 and max(l0) - min(l0) < 1e-9 and tab.cells(schema.ALIVE_LATENTS_ADAPTER_SAE):
        f = trend_finding(tab, "density_rank", schema.ALIVE_LATENTS_ADAPTER_SAE, title, "alive latents")
        note = (f"L0 is fixed at {_f(l0[0])} by the SAE architecture (TopK), so density is read as the number of "
                "latents alive on held-out Δ. ")
        return dataclasses.replace(f, text=note + f.text)
    return trend_finding(tab, "density_rank", schema.L0_ADAPTER_SAE, title, "L0")


def effective_rank_finding(tab: Tab) -> Finding:
    title = "Δ spreads beyond the LoRA rank"
    rule = ("at a cell of known rank r, holds if more than r principal components are needed for 90% of Δ's variance "
            "(pca_k90 > r): the residual Δ carries downstream effects, so it is not confined to rank r")
    cells = [c for c in tab.cells(schema.PCA_K90) if tab.rank(c[1]) >= 0]
    if not cells:
        return Finding("effective_rank", title, NOT_MEASURED, "PCA spectrum of Δ not in the table.", rule)
    passes = [tab.value(schema.PCA_K90, *c) > tab.rank(c[1]) for c in cells]
    c = cells[-1]
    k90, pr = tab.value(schema.PCA_K90, *c), tab.value(schema.EFFECTIVE_RANK_PR, *c)
    text = (f"{_f(k90)} components hold 90% of Δ's variance at LoRA rank {tab.rank(c[1])} (layer {c[0]}; "
            f"participation ratio {_f(pr)}). Exceeds the rank at {_count(passes, 'cells')}.")
    nums = {schema.PCA_K90: k90, "participation_ratio": pr, "rank": tab.rank(c[1]), "layer": c[0],
            "cells": len(cells), "cells_passing": int(sum(passes))}
    return Finding("effective_rank", title, _verdict(passes), text, rule, nums)


def splice_finding(tab: Tab) -> Finding:
    title = "Adapter SAE reconstruction keeps the adapter's behaviour"
    rule = ("at a cell, holds if the CI of the KL fraction recovered with the adapter SAE's Δ̂ lies above that of the "
            "SAE(h_ft)−SAE(h_base) control (above 0, the removed-adapter null, when the control is absent)")
    cells = tab.cells(schema.KL_RECOVERED_ADAPTER_SAE)
    if not cells:
        return Finding("splice", title, NOT_MEASURED, "Splice KL not in the table.", rule)
    passes = []
    for c in cells:
        ctrl = tab.get(schema.KL_RECOVERED_REF_DIFF, *c)
        passes.append(tab.get(schema.KL_RECOVERED_ADAPTER_SAE, *c).lower() > (ctrl.upper() if ctrl else 0.0))
    c = cells[-1]
    s, ctrl = tab.get(schema.KL_RECOVERED_ADAPTER_SAE, *c), tab.get(schema.KL_RECOVERED_REF_DIFF, *c)
    kl = tab.value(schema.KL_ADAPTED_VS_BASE, *c)
    text = (f"KL recovered {_f(s.value)}{_ci(s)} with the adapter SAE"
            + (f" vs {_f(ctrl.value)}{_ci(ctrl)} for SAE(h_ft)−SAE(h_base)" if ctrl else "")
            + f" (KL(adapted‖base) {_f(kl)} nats/token, {_where(tab, *c)}). Better at {_count(passes, 'cells')}.")
    nums = {schema.KL_RECOVERED_ADAPTER_SAE: s.value, schema.KL_RECOVERED_REF_DIFF: ctrl.value if ctrl else math.nan,
            schema.KL_ADAPTED_VS_BASE: kl, "layer": c[0], "adapter": c[1], "cells": len(cells),
            "cells_passing": int(sum(passes))}
    return Finding("splice", title, _verdict(passes), text, rule, nums)


def subspace_finding(tab: Tab) -> Finding:
    title = "Δ's subspace overlaps the reference subspace beyond chance"
    rule = ("for every mean_cos2_* comparison at every cell, holds there if its CI lower bound exceeds k/d, the "
            "expected mean cos² of random k-dim subspaces")
    pairs = [(m, c) for m in tab.metrics(schema.MEAN_COS2) for c in tab.cells(m)]
    pairs = [(m, c) for m, c in pairs if math.isfinite(tab.get(m, *c).null)]
    if not pairs:
        return Finding("subspace", title, NOT_MEASURED, "Subspace comparisons with a k/d null not in the table.", rule)
    passes = [tab.get(m, *c).lower() > tab.get(m, *c).null for m, c in pairs]
    m, c = pairs[-1]
    s = tab.get(m, *c)
    text = (f"mean cos² {_f(s.value)}{_ci(s)} vs random k/d {_f(s.null)} ({m.removeprefix('mean_cos2_')}, "
            f"{_where(tab, *c)}). Above chance at {_count(passes, 'comparisons')}.")
    nums = {"metric": m, "value": s.value, "null": s.null, "layer": c[0], "adapter": c[1],
            "comparisons": len(pairs), "comparisons_passing": int(sum(passes))}
    return Finding("subspace", title, _verdict(passes), text, rule, nums)


CKA_SHARED = 0.5


def cka_finding(tab: Tab) -> Finding:
    title = "Adapters of different ranks change similar directions"
    rule = (f"per layer, mean linear CKA of Δ over adapter pairs; holds at a layer if ≥ {CKA_SHARED} (a convention, "
            "not a test: CKA has no null here)")
    ms = tab.metrics(schema.CKA_DELTA_VS)
    by_layer: dict[int, list[float]] = {}
    for m in ms:
        for layer, a in tab.cells(m):
            v = tab.value(m, layer, a)
            if math.isfinite(v) and m != f"cka_delta_vs_{a}":
                by_layer.setdefault(layer, []).append(v)
    if not by_layer:
        return Finding("cka", title, NOT_MEASURED, "CKA between adapters not in the table (needs ≥ 2 adapters).",
                       rule)
    means = {k: float(np.mean(v)) for k, v in sorted(by_layer.items())}
    passes = [v >= CKA_SHARED for v in means.values()]
    parts = ", ".join(f"layer {k}: {_f(v)}" for k, v in means.items())
    text = f"mean CKA between adapters' Δ — {parts}. Shared at {_count(passes, 'layers')}."
    return Finding("cka", title, _verdict(passes), text, rule, {"mean_cka_by_layer": {str(k): v for k, v in
                                                                                      means.items()}})


def compute_findings(df) -> list[Finding]:
    """All findings of a results table, in report order."""
    tab = Tab(normalize_frame(df))
    return [reconstruction_finding(tab), alignment_finding(tab),
            density_finding(tab), *[f for f in (density_depth_finding(tab),) if f is not None],
            trend_finding(tab, "delta_norm_rank", schema.DELTA_NORM_MEAN, "Δ norm grows with rank", "mean ‖Δ‖"),
            effective_rank_finding(tab), splice_finding(tab), subspace_finding(tab), cka_finding(tab)]


def findings_markdown(df) -> str:
    """Findings as a Markdown list (verdict, title, numbers, rule)."""
    lines = ["## Findings", ""]
    for f in compute_findings(df):
        lines.append(f"- **{f.title}** — *{f.verdict}*. {f.text}  ")
        lines.append(f"  Rule: {f.rule}.")
    return "\n".join(lines) + "\n"
