"""Trends over LoRA rank and over depth, read as slopes with paired document-bootstrap intervals and exact
permutation p-values (:mod:`lorascope.geometry.trends`), never as the sign of a rank correlation.

Rank trends use only adapters trained by the study with one recipe (same target modules, data and steps; the
rank is the only thing that differs); adapters loaded from folders have an unknown recipe and never enter a rank
trend. Depth trends are per adapter, over the study's layers. With P points the smallest two-sided permutation
p-value is 2/P! (4 ranks: 1/12), so below 5 points the verdict is "not testable here" whatever the data.
"""

from __future__ import annotations

import math

import torch

from lorascope import results_schema as schema
from lorascope.geometry import ratio_samples, trend_test
from lorascope.geometry.bootstrap import _percentiles, document_sums
from lorascope.geometry.trends import ols_slope
from lorascope.results import ResultRow


def per_document(values: torch.Tensor, doc_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(document ids [U], per-document sums [U], token counts [U]) of per-token ``values`` [N]."""
    ids = torch.unique(doc_index)
    sums, counts = document_sums(values.double(), doc_index)
    return ids, sums, counts


def trend_rows(
    x: list[float],
    points: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    metric: str,
    p_metric: str,
    n_boot: int,
    seed: int,
    family: str,
    **where,
) -> list[ResultRow]:
    """Slope of Σ num / Σ den over ``x`` with the paired document bootstrap (the same documents at every point;
    points whose documents differ are not comparable and give no rows), and its permutation p-value row
    (``null_value`` = the smallest p-value the design can reach, ``null_name`` "min_attainable_p")."""
    if len(points) < 2 or any(not torch.equal(p[0], points[0][0]) for p in points) or points[0][0].numel() < 2:
        return []
    num = torch.stack([p[1] for p in points])
    den = torch.stack([p[2] for p in points])
    point, samples = ratio_samples(num, den, n_boot=max(n_boot, 100), seed=seed)
    xt = torch.tensor(x, dtype=torch.float64)
    t = trend_test(xt, point, samples, expected="increasing", seed=seed)
    if not math.isfinite(t.slope) and float(xt.std()) > 0:  # 2 points: the slope exists, its test does not
        lo, hi = _percentiles(ols_slope(xt, samples), 0.05)
        t = t._replace(slope=float(ols_slope(xt, point)), ci_low=float(lo), ci_high=float(hi))
    note = f"{t.n_points} points, {t.direction}; verdict: {t.verdict}"
    common = dict(family=family, n=t.n_points, **where)
    if not math.isfinite(t.slope):
        return []
    return [
        ResultRow(
            metric=metric, value=t.slope, ci_low=t.ci_low, ci_high=t.ci_high, ci_unit=t.ci_unit, note=note, **common
        ),
        ResultRow(
            metric=p_metric,
            value=t.p_value if math.isfinite(t.p_value) else 1.0,
            null_value=t.min_p,
            null_name=schema.NULL_MIN_P,
            note=note,
            **common,
        ),
    ]
