"""The study's claims as findings: numbers, CIs and nulls from the results table, and a verdict from a stated rule.

Every per-cell test reads a statistic against its *strongest* control with intervals that resample documents
(or seeds / atoms, labelled in the table's ``ci_unit`` column); see docs/statistics.md. Aggregation over cells
(layer × adapter, or layer for trends): ``holds`` if the claim holds at every cell, ``does not hold`` if at none,
``mixed`` otherwise, ``not testable here`` when no cell could test it (too few points, no interval) and ``not
measured`` when the table lacks the rows. The alignment finding reports its own scale instead (``no
alignment`` / ``weak`` / ``at ceiling``). The headline numbers quote the deepest layer and the largest rank.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lorascope import results_schema as schema
from lorascope.geometry.trends import _verdict as trend_cell_verdict
from lorascope.geometry.verdicts import alignment_verdict, overlap_verdict, reconstruction_verdict
from lorascope.report._table import Stat, Tab
from lorascope.report.run import normalize_frame

HOLDS, NOT_HOLDS, MIXED, NOT_MEASURED = "holds", "does not hold", "mixed", "not measured"
NOT_TESTABLE = "not testable here"
ALPHA = 0.05


@dataclass
class Finding:
    """One claim: ``verdict`` is one of holds / does not hold / mixed / not testable here / not measured (the
    alignment finding: no alignment / weak / at ceiling / mixed / not testable here / not measured)."""

    key: str
    title: str
    verdict: str
    text: str
    rule: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _aggregate(verdicts: list[str]) -> str:
    """holds / does not hold / mixed over cells; cells that could not test are left out (all of them: not
    testable here)."""
    tested = [v for v in verdicts if v != NOT_TESTABLE]
    if not verdicts:
        return NOT_MEASURED
    if not tested:
        return NOT_TESTABLE
    return HOLDS if all(v == HOLDS for v in tested) else NOT_HOLDS if not any(v == HOLDS for v in tested) else MIXED


def _tally(verdicts: list[str]) -> str:
    return ", ".join(f"{v} at {n}/{len(verdicts)}" for v, n in Counter(verdicts).most_common())


def _f(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _ci(s: Stat | None) -> str:
    return f" [{_f(s.lo)}, {_f(s.hi)}]" if s is not None and s.has_ci else ""


def _where(tab: Tab, layer: int, adapter: str) -> str:
    r = tab.rank(adapter)
    return f"layer {layer}, rank {r}" if r >= 0 else f"layer {layer}, adapter {adapter}"


def _interval(s: Stat | None) -> tuple[float, float]:
    return (s.lo, s.hi) if s is not None else (math.nan, math.nan)


def _reconstruction_cell(tab: Tab, c: tuple[int, str]) -> str:
    v = reconstruction_verdict(
        _interval(tab.get(schema.FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL, *c)),
        _interval(tab.get(schema.FVU_ADAPTER_SAE, *c)),
    )
    init = tab.get(schema.FVU_GAP_ADAPTER_SAE_VS_SAE_INIT, *c)
    if v != HOLDS or init is None:
        return v
    return NOT_TESTABLE if not init.has_ci else HOLDS if init.hi < 0 else NOT_HOLDS


def reconstruction_cells(tab: Tab) -> dict[tuple[int, str], str]:
    """Per (layer, adapter): geometry.verdicts.reconstruction_verdict(gap CI, FVU(adapter SAE) CI), and — when the
    table has it — the paired gap to the same architecture at initialisation must lie below 0 too."""
    return {c: _reconstruction_cell(tab, c) for c in tab.cells(schema.FVU_ADAPTER_SAE)}


def reconstruction_finding(tab: Tab) -> Finding:
    title = "Adapter SAE reconstructs Δ better than the best control"
    rule = (
        "at a layer×adapter cell, holds if the document-bootstrap CI of FVU(adapter SAE) − FVU(best control) "
        "lies wholly below 0 (best control: the lower-FVU of SAE_ref(h_ft)−SAE_ref(h_base) and least squares on "
        "the reference atoms active on h_ft; the CI is paired over the same resamples), the CI of "
        "FVU(adapter SAE) lies below 1 (the mean predictor) and the paired CI of FVU(adapter SAE) − FVU(the same "
        "SAE at initialisation, fed Δ) lies below 0; no interval: not testable here"
    )
    cells = reconstruction_cells(tab)
    if not cells:
        return Finding("reconstruction", title, NOT_MEASURED, "FVU of the adapter SAE not in the table.", rule)
    c = list(cells)[-1]
    a, gap = tab.get(schema.FVU_ADAPTER_SAE, *c), tab.get(schema.FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL, *c)
    ctrl = {m: tab.value(m, *c) for m in (schema.FVU_REF_DIFF, schema.FVU_REF_LSTSQ_ACTIVE, schema.FVU_REF_ON_DELTA)}
    names = {
        schema.FVU_REF_DIFF: "SAE(h_ft)−SAE(h_base)",
        schema.FVU_REF_LSTSQ_ACTIVE: "lstsq on active ref atoms",
        schema.FVU_REF_ON_DELTA: "reference SAE fed Δ (weakest)",
    }
    ctrl_txt = ", ".join(f"{names[m]} {_f(v)}" for m, v in ctrl.items() if math.isfinite(v))
    gv = gap.value if gap else math.nan
    text = (
        f"FVU {_f(a.value)}{_ci(a)} for the adapter SAE; gap to the best control {_f(gv)}{_ci(gap)}"
        f" ({_where(tab, *c)}; null: FVU 1 for the mean predictor)"
        + (f"; controls: {ctrl_txt}" if ctrl_txt else "")
        + f". {_tally(list(cells.values()))}."
    )
    nums = {
        schema.FVU_ADAPTER_SAE: a.value,
        schema.FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL: gap.value if gap else math.nan,
        **ctrl,
        "layer": c[0],
        "adapter": c[1],
        "cells": len(cells),
        "cells_holding": sum(v == HOLDS for v in cells.values()),
    }
    return Finding("reconstruction", title, _aggregate(list(cells.values())), text, rule, nums)


def alignment_cells(tab: Tab) -> dict[tuple[int, str], str]:
    """Per (layer, adapter): geometry.verdicts.alignment_verdict(MMCS, its CI, the strongest null, the
    seed-vs-seed ceiling's interval (None without a second seed))."""
    out = {}
    for c in tab.cells(schema.MMCS_ADAPTER_TO_REF):
        s = tab.get(schema.MMCS_ADAPTER_TO_REF, *c)
        ceil = tab.get(schema.MMCS_SEED_VS_SEED, *c)
        ceiling = None if ceil is None else ((ceil.lo, ceil.hi) if ceil.has_ci else ceil.value)
        out[c] = alignment_verdict(s.value, (s.lo, s.hi), s.null, ceiling)
    return out


def alignment_finding(tab: Tab) -> Finding:
    title = "Alignment between adapter SAE and reference dictionary"
    rule = (
        "at a cell, MMCS(adapter→reference) over alive atoms of both is 'no alignment' unless its CI (over "
        "seeds, or over atoms with one seed) lies above the strongest null (isotropic random atoms, random atoms "
        "with Δ's training covariance, the adapter SAE at its initialisation); 'at ceiling' when its CI reaches "
        "the seed-vs-seed ceiling's lower bound (same alive atoms); 'weak' in between; 'not testable here' "
        "instead of 'no alignment' when the ceiling itself is not above the strongest null (the recipe's own seeds "
        "agree no better than random atoms, so no reference could show alignment); the finding reports the "
        "cells' common verdict, or 'mixed'"
    )
    cells = alignment_cells(tab)
    if not cells:
        return Finding("alignment", title, NOT_MEASURED, "MMCS adapter→reference not in the table.", rule)
    c = list(cells)[-1]
    s = tab.get(schema.MMCS_ADAPTER_TO_REF, *c)
    ceil = tab.get(schema.MMCS_SEED_VS_SEED, *c)
    ceil_txt = f"seed-vs-seed ceiling {_f(ceil.value)}{_ci(ceil)}" if ceil else "no seed-vs-seed ceiling"
    nulls = {
        m: tab.value(m, *c)
        for m in (schema.MMCS_NULL_ISOTROPIC, schema.MMCS_NULL_COV_MATCHED, schema.MMCS_NULL_SAE_INIT)
    }
    text = (
        f"MMCS(adapter→reference) {_f(s.value)}{_ci(s)} vs strongest null {_f(s.null)} and {ceil_txt} "
        f"({_where(tab, *c)}). {_tally(list(cells.values()))}."
    )
    verdicts = set(cells.values())
    verdict = next(iter(verdicts)) if len(verdicts) == 1 else MIXED
    nums = {
        "mmcs": s.value,
        "ci_low": s.lo,
        "ci_high": s.hi,
        "null": s.null,
        **nulls,
        "ceiling": ceil.value if ceil else math.nan,
        "layer": c[0],
        "adapter": c[1],
        "cells": len(cells),
        "verdicts": dict(Counter(cells.values())),
    }
    return Finding("alignment", title, verdict, text, rule, nums)


def _trend_cell(tab: Tab, metric: str, p_metric: str, layer: int, adapter: str = "") -> str:
    s, p = tab.get(metric, layer, adapter), tab.get(p_metric, layer, adapter)
    if s is None or p is None:
        return NOT_TESTABLE
    direction = "increasing" if s.value > 0 else "decreasing" if s.value < 0 else "flat"
    return trend_cell_verdict(p.value, p.null, s.lo, s.hi, ALPHA, direction, "increasing")


def trend_finding(tab: Tab, key: str, metric: str, p_metric: str, title: str, what: str, over: str = "rank") -> Finding:
    """A slope over log2 rank (per layer, same-recipe adapters) or over layers (per adapter)."""
    rule = (
        f"per {'layer' if over == 'rank' else 'adapter'}, OLS slope of {what} on "
        f"{'log2 LoRA rank across adapters trained with one recipe' if over == 'rank' else 'layer index'}; "
        "holds there if the exact permutation p ≤ 0.05 and the paired document-bootstrap CI of the slope lies "
        "above 0; not testable here when the design cannot reach p ≤ 0.05 (fewer than 5 points: 4 ranks or "
        "layers give at best p = 1/12)"
    )
    if over == "rank":
        keys = [(layer, "") for layer in tab.layers(metric)]
    else:
        keys = [(-1, a) for a in tab.adapters() if tab.get(metric, -1, a) is not None]
    if not keys:
        return Finding(key, title, NOT_MEASURED, f"a trend of {what} is not in the table.", rule)
    verdicts = [_trend_cell(tab, metric, p_metric, *k) for k in keys]
    k = keys[-1]
    s, p = tab.get(metric, *k), tab.get(p_metric, *k)
    where = f"layer {k[0]}" if over == "rank" else f"adapter {k[1]}"
    text = (
        f"slope of {what} per {'doubling of rank' if over == 'rank' else 'layer'} {_f(s.value)}{_ci(s)}, "
        f"permutation p {_f(p.value if p else math.nan)} (smallest attainable {_f(p.null if p else math.nan)}; "
        f"{where}). {_tally(verdicts)}."
    )
    nums = {
        "slope": s.value,
        "ci_low": s.lo,
        "ci_high": s.hi,
        "p": p.value if p else math.nan,
        "min_p": p.null if p else math.nan,
        "cells": len(keys),
    }
    return Finding(key, title, _aggregate(verdicts), text, rule, nums)


def density_finding(tab: Tab) -> Finding:
    """L0 rises with rank; when the architecture fixes L0 (TopK: L0 = k everywhere) the claim is not testable."""
    title = "Feature density rises with rank"
    free = free_l0_text(tab)
    if tab.layers(schema.TREND_FREE_L0_RANK):  # the density stage's free-L0 SAEs: the test where L0 can move
        what = "the free-L0 SAE's L0 (fixed coefficient)"
        f = trend_finding(tab, "density_rank", schema.TREND_FREE_L0_RANK, schema.TREND_FREE_L0_RANK_P, title, what)
        return Finding(f.key, title, f.verdict, f.text + free + matched_fvu_text(tab), f.rule, f.numbers)
    l0 = [tab.value(schema.L0_ADAPTER_SAE, *c) for c in tab.cells(schema.L0_ADAPTER_SAE)]
    l0 = [v for v in l0 if math.isfinite(v)]
    f = trend_finding(tab, "density_rank", schema.TREND_L0_RANK, schema.TREND_L0_RANK_P, title, "L0")
    if len(l0) > 1 and max(l0) - min(l0) < 1e-9:
        return Finding(
            f.key,
            title,
            NOT_TESTABLE,
            f"L0 is fixed at {_f(l0[0])} by the SAE architecture (TopK), so density cannot rise with rank here.{free}",
            f.rule,
            f.numbers,
        )
    return Finding(f.key, f.title, f.verdict, f.text + free, f.rule, f.numbers)


def matched_fvu_text(tab: Tab, over: str = "rank") -> str:
    """The density stage's matched-quality reading: L0 at the coefficient whose held-out FVU hits the target, per rank
    at the deepest layer (``over="rank"``) or per layer at the highest rank (``"depth"``), beside the spread of the
    fixed-coefficient FVU (which says whether the fixed-coefficient L0 compares SAEs of equal quality).
    Descriptive: one coefficient search per cell, no interval."""
    import re

    metric = schema.L0_MATCHED_FVU
    cells = [(layer, tab.rank(a), tab.value(metric, layer, a)) for layer, a in tab.cells(metric)]
    cells = [c for c in cells if c[1] >= 0 and math.isfinite(c[2])]
    if not cells:
        return ""
    notes = {
        m.group(0)
        for n in tab.df.loc[tab.df.metric == metric, "note"]
        if (m := re.match(r"target FVU [0-9.eE+-]+", str(n)))
    }
    deepest, top = max(c[0] for c in cells), max(c[1] for c in cells)
    if over == "rank":
        points = ", ".join(f"{_f(v)} (rank {r})" for r, v in sorted((r, v) for x, r, v in cells if x == deepest))
        where = f"layer {deepest}"
    else:
        points = ", ".join(f"{_f(v)} (layer {x})" for x, v in sorted((x, v) for x, r, v in cells if r == top))
        where = f"rank {top}"
    fvu = [tab.value(schema.FVU_FIXED_COEFFICIENT, *c) for c in tab.cells(schema.FVU_FIXED_COEFFICIENT)]
    fvu = [v for v in fvu if math.isfinite(v)]
    spread = (
        f" The fixed-coefficient SAEs reach held-out FVU {_f(min(fvu))}–{_f(max(fvu))} across cells, so their L0 "
        "compares dictionaries of unequal quality; the matched reading does not."
        if fvu
        else ""
    )
    return (
        f" At matched reconstruction ({', '.join(sorted(notes)) or 'target FVU'}; one coefficient search per cell, "
        f"no interval): L0 {points} at {where}.{spread}"
    )


def density_depth_finding(tab: Tab) -> Finding:
    """The free-L0 SAE's L0 over layers (per adapter), with the matched-reconstruction reading beside it."""
    f = trend_finding(
        tab,
        "density_depth",
        schema.TREND_FREE_L0_DEPTH,
        schema.TREND_FREE_L0_DEPTH_P,
        "Feature density rises with depth",
        "the free-L0 SAE's L0 (fixed coefficient)",
        over="depth",
    )
    return Finding(f.key, f.title, f.verdict, f.text + matched_fvu_text(tab, over="depth"), f.rule, f.numbers)


def free_l0_text(tab: Tab) -> str:
    """What the density stage's free-L0 SAEs (one per cell, fixed coefficient) measured, per rank at the deepest
    layer and per layer at the highest rank, with each cell's document-bootstrap CI where the table has one."""
    metric = schema.L0_FIXED_COEFFICIENT
    cells = [(layer, a, tab.rank(a), tab.get(metric, layer, a)) for layer, a in tab.cells(metric)]
    cells = [c for c in cells if c[2] >= 0 and c[3] is not None and math.isfinite(c[3].value)]
    if not cells:
        return ""
    notes = sorted({str(n) for n in tab.df.loc[tab.df.metric == metric, "note"] if isinstance(n, str) and n})
    deepest, top = max(c[0] for c in cells), max(c[2] for c in cells)
    by_rank = sorted(((r, v) for layer, _, r, v in cells if layer == deepest), key=lambda t: t[0])
    by_layer = sorted(((layer, v) for layer, _, r, v in cells if r == top), key=lambda t: t[0])
    one_sae = "one SAE per cell: the intervals are over documents, not over SAE seeds"
    return (
        f" Free-L0 SAE ({'; '.join(notes) or 'fixed coefficient'}): L0 "
        f"{', '.join(f'{_f(v.value)}{_ci(v)} (rank {r})' for r, v in by_rank)} at layer {deepest}; "
        f"{', '.join(f'{_f(v.value)}{_ci(v)} (layer {x})' for x, v in by_layer)} at rank {top} ({one_sae})."
    )


def effective_rank_finding(tab: Tab) -> Finding:
    title = "Δ spreads beyond the LoRA rank"
    rule = (
        "at a cell of known rank r, holds if more than r principal components are needed for 90% of Δ's variance "
        "(pca_k90 > r): the residual Δ carries downstream effects, so it is not confined to rank r"
    )
    cells = [c for c in tab.cells(schema.PCA_K90) if tab.rank(c[1]) >= 0]
    if not cells:
        return Finding("effective_rank", title, NOT_MEASURED, "PCA spectrum of Δ not in the table.", rule)
    passes = [tab.value(schema.PCA_K90, *c) > tab.rank(c[1]) for c in cells]
    c = cells[-1]
    k90, pr = tab.value(schema.PCA_K90, *c), tab.value(schema.EFFECTIVE_RANK_PR, *c)
    text = (
        f"{_f(k90)} components hold 90% of Δ's variance at LoRA rank {tab.rank(c[1])} (layer {c[0]}; "
        f"participation ratio {_f(pr)}). Exceeds the rank at {sum(passes)}/{len(passes)} cells."
    )
    nums = {
        schema.PCA_K90: k90,
        "participation_ratio": pr,
        "rank": tab.rank(c[1]),
        "layer": c[0],
        "cells": len(cells),
        "cells_passing": int(sum(passes)),
    }
    return Finding("effective_rank", title, _aggregate([HOLDS if x else NOT_HOLDS for x in passes]), text, rule, nums)


def _splice_cell(tab: Tab, c: tuple[int, str]) -> str:
    s = tab.get(schema.KL_RECOVERED_REL_ADAPTER_SAE, *c)
    if s is None or not s.has_ci:
        return NOT_TESTABLE
    mean = tab.get(schema.kl_recovered_rel("mean_delta"), *c)
    bar = max(0.0, mean.upper() if mean is not None else 0.0)
    return HOLDS if s.lo > bar else NOT_HOLDS


def splice_finding(tab: Tab) -> Finding:
    title = "Adapter SAE reconstruction keeps the adapter's behaviour beyond doing nothing"
    rule = (
        "at a cell, holds if the document-bootstrap CI of the KL recovered by the adapter SAE's Δ̂ — relative "
        "to splicing Δ̂ = 0 (1 − KL(adapted‖splice)/KL(adapted‖splice₀); the adapter still acts after the spliced "
        "layer, so Δ̂ = 0 already recovers part of KL(adapted‖base)) — lies above 0 and above the CI of the "
        "Δ̂ = mean Δ (training documents) baseline"
    )
    cells = {c: _splice_cell(tab, c) for c in tab.cells(schema.KL_RECOVERED_REL_ADAPTER_SAE)}
    if not cells:
        return Finding("splice", title, NOT_MEASURED, "Splice KL not in the table.", rule)
    c = list(cells)[-1]
    s = tab.get(schema.KL_RECOVERED_REL_ADAPTER_SAE, *c)
    ctrl, mean = tab.get(schema.KL_RECOVERED_REL_REF_DIFF, *c), tab.get(schema.kl_recovered_rel("mean_delta"), *c)
    raw0 = tab.value(schema.kl_recovered_raw("zero"), *c)
    kl = tab.value(schema.KL_ADAPTED_VS_BASE, *c)
    text = (
        f"KL recovered beyond Δ̂ = 0: {_f(s.value)}{_ci(s)} with the adapter SAE"
        + (f", {_f(ctrl.value)}{_ci(ctrl)} for SAE(h_ft)−SAE(h_base)" if ctrl else "")
        + (f", {_f(mean.value)}{_ci(mean)} for Δ̂ = mean Δ" if mean else "")
        + f"; Δ̂ = 0 alone recovers {_f(raw0)} of KL(adapted‖base) = {_f(kl)} nats/token ({_where(tab, *c)}). "
        + f"{_tally(list(cells.values()))}."
    )
    nums = {
        schema.KL_RECOVERED_REL_ADAPTER_SAE: s.value,
        schema.KL_RECOVERED_REL_REF_DIFF: ctrl.value if ctrl else math.nan,
        "raw_recovered_by_zero": raw0,
        schema.KL_ADAPTED_VS_BASE: kl,
        "layer": c[0],
        "adapter": c[1],
        "cells": len(cells),
        "cells_holding": sum(v == HOLDS for v in cells.values()),
    }
    return Finding("splice", title, _aggregate(list(cells.values())), text, rule, nums)


def subspace_cells(tab: Tab) -> dict[tuple[int, str], str]:
    """Per (layer, adapter): overlap_verdict(selection-aware overlap of the reference's selected atoms with
    PCA(Δ), the 95th percentile of the same selection on random dictionaries)."""
    name = schema.PCA_DELTA_VS_REF_TOPK
    out = {}
    for c in tab.cells(schema.selected_cos2(name)):
        v = overlap_verdict(
            tab.value(schema.selected_cos2(name), *c), tab.value(schema.selected_cos2_null_q95(name), *c)
        )
        out[c] = {"beyond chance": HOLDS, "at chance": NOT_HOLDS}.get(v, v)
    return out


def subspace_finding(tab: Tab) -> Finding:
    title = "Δ's subspace overlaps the reference subspace beyond chance"
    rule = (
        "at a cell, holds if the split-half overlap (mean cos²) of the reference's top-k atoms, selected by "
        "energy on half of the held-out documents, with PCA_k(Δ) of the other half exceeds the 95th percentile "
        "of the same selection run on random isotropic and covariance-matched dictionaries; only comparisons "
        "that involve the reference count (k/d is no null for atoms selected on Δ)"
    )
    cells = subspace_cells(tab)
    if not cells:
        return Finding("subspace", title, NOT_MEASURED, "Selection-aware subspace overlap not in the table.", rule)
    c = list(cells)[-1]
    name = schema.PCA_DELTA_VS_REF_TOPK
    s, q95 = tab.get(schema.selected_cos2(name), *c), tab.value(schema.selected_cos2_null_q95(name), *c)
    text = (
        f"split-half mean cos² {_f(s.value)} vs selected-random null {_f(s.null)} (95th percentile {_f(q95)}; "
        f"{_where(tab, *c)}). {_tally(list(cells.values()))}."
    )
    nums = {
        "value": s.value,
        "null": s.null,
        "null_q95": q95,
        "layer": c[0],
        "adapter": c[1],
        "cells": len(cells),
        "cells_holding": sum(v == HOLDS for v in cells.values()),
    }
    return Finding("subspace", title, _aggregate(list(cells.values())), text, rule, nums)


def cka_finding(tab: Tab) -> Finding:
    title = "Adapters of different ranks change similar directions"
    rule = (
        "per layer and adapter pair, debiased linear CKA of Δ on the same held-out tokens against a null that "
        "re-pairs whole documents; a pair shares directions if the permutation p ≤ 0.05; holds at a layer if "
        "every pair does"
    )
    by_layer: dict[int, list[tuple[float, float, float]]] = {}
    seen: set[tuple[int, frozenset]] = set()
    for m in tab.metrics(schema.CKA_DELTA_VS):
        for layer, a in tab.cells(m):
            b = m.removeprefix(schema.CKA_DELTA_VS)
            if b == a or (layer, frozenset((a, b))) in seen:  # each unordered pair once
                continue
            seen.add((layer, frozenset((a, b))))
            p = tab.get(schema.cka_extra(m, "p"), layer, a)
            by_layer.setdefault(layer, []).append(
                (tab.value(m, layer, a), tab.get(m, layer, a).null, p.value if p else math.nan)
            )
    if not by_layer:
        return Finding("cka", title, NOT_MEASURED, "CKA between adapters not in the table (needs ≥ 2 adapters).", rule)
    verdicts = [
        NOT_TESTABLE
        if any(not math.isfinite(p) for _, _, p in v)
        else HOLDS
        if all(p <= ALPHA for _, _, p in v)
        else NOT_HOLDS
        for v in by_layer.values()
    ]
    parts = "; ".join(
        f"layer {k}: mean {_f(float(np.mean([x[0] for x in v])))} vs null mean "
        f"{_f(float(np.mean([x[1] for x in v])))}, max p {_f(max(x[2] for x in v))}"
        for k, v in sorted(by_layer.items())
    )
    text = f"debiased CKA between adapters' Δ — {parts}. {_tally(verdicts)}."
    nums = {"mean_cka_by_layer": {str(k): float(np.mean([x[0] for x in v])) for k, v in by_layer.items()}}
    return Finding("cka", title, _aggregate(verdicts), text, rule, nums)


CAUTION = "caution"


def reference_overlap_findings(tab: Tab) -> list[Finding]:
    """A caution first in the list when ``reference_sae.allow_overlap`` let a reference SAE trained on some of
    the evaluation documents through (rows of schema.REFERENCE_EVAL_OVERLAP > 0); none otherwise."""
    df = tab.df
    rows = df[(df["metric"] == schema.REFERENCE_EVAL_OVERLAP) & (df["value"] > 0)]
    if rows.empty:
        return []
    where = ", ".join(f"layer {int(r.layer)}: {int(r.value)} documents" for r in rows.itertuples())
    text = (
        f"The reference SAE was trained on some of this run's evaluation (held-out) documents ({where}); "
        "reference_sae.allow_overlap let it through. Findings that use the reference (reconstruction, "
        "alignment, subspace overlap) read it on text it saw in training, which favours it."
    )
    rule = "a reference SAE must not have been trained on the evaluation documents (refused unless allowed)"
    return [Finding("reference_overlap", "Reference SAE saw evaluation documents", CAUTION, text, rule)]


def compute_findings(df) -> list[Finding]:
    """All findings of a results table, in report order (a reference-overlap caution first, when there is one)."""
    tab = Tab(normalize_frame(df))
    return [
        *reference_overlap_findings(tab),
        reconstruction_finding(tab),
        alignment_finding(tab),
        density_finding(tab),
        trend_finding(
            tab,
            "delta_norm_rank",
            schema.TREND_DELTA_NORM_RANK,
            schema.TREND_DELTA_NORM_RANK_P,
            "Δ norm grows with rank",
            "mean ‖Δ‖",
        ),
        trend_finding(
            tab,
            "delta_norm_depth",
            schema.TREND_DELTA_NORM_DEPTH,
            schema.TREND_DELTA_NORM_DEPTH_P,
            "Δ norm grows with depth",
            "mean ‖Δ‖",
            over="depth",
        ),
        density_depth_finding(tab),
        effective_rank_finding(tab),
        splice_finding(tab),
        subspace_finding(tab),
        cka_finding(tab),
    ]


def findings_markdown(df) -> str:
    """Findings as a Markdown list (verdict, title, numbers, rule)."""
    lines = [
        "## Findings",
        "",
        "Intervals resample documents unless the table's ci_unit column says seed or atom (see docs/statistics.md).",
        "",
    ]
    for f in compute_findings(df):
        lines.append(f"- **{f.title}** — *{f.verdict}*. {f.text}  ")
        lines.append(f"  Rule: {f.rule}.")
    return "\n".join(lines) + "\n"
