"""Is a statistic trending over adapter rank or layer depth? Slope, document-bootstrap interval, permutation p.

With P points (ranks or layers) and one statistic per point, the claim "it grows with rank" needs both:
- a slope whose interval excludes 0, the interval from resampling *documents* jointly at every point (the same
  held-out documents are measured at every rank/layer, so one resample serves all points; Efron & Tibshirani
  1993 §8.5 on resampling the independent units). This covers measurement noise only, not adapter-to-adapter
  variation (one adapter per rank);
- a permutation p-value for the slope over relabellings of the points (exact enumeration of all P!
  assignments up to P = 8, Monte Carlo beyond). Its smallest attainable value is (ties)/P!: with 4 points a
  two-sided test cannot go below 2/24 = 0.083, so no 4-point trend is ever significant at 0.05 — the verdict is
  then "not testable here", never "holds" (Good 2005, *Permutation, Parametric and Bootstrap Tests*, ch. 3).
Rank (or depth) trends must only mix adapters trained with the same recipe; the caller groups them.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor
from lorascope.geometry.bootstrap import _percentiles, resample_counts

NOT_TESTABLE = "not testable here"
TREND_VERDICTS = ("holds", "does not hold", NOT_TESTABLE)
_EXACT_MAX_POINTS = 8


class TrendTest(NamedTuple):
    """OLS slope of the statistic on x, its interval (``ci_unit``), two-sided permutation p-value, the smallest
    p-value the design allows, number of points, direction ("increasing"/"decreasing"/"flat") and verdict."""

    slope: float
    ci_low: float
    ci_high: float
    ci_unit: str
    p_value: float
    min_p: float
    n_points: int
    direction: str
    verdict: str


def ols_slope(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of y [..., P] on x [P] along the last axis (float64)."""
    xc = x - x.mean()
    return ((y - y.mean(-1, keepdim=True)) * xc).sum(-1) / (xc * xc).sum()


def ratio_samples(num, den=None, n_boot: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Point [P] and document-bootstrap samples [n_boot, P] of Σ_u num[p, u] / Σ_u den[p, u].

    num, den [P, U]: per-point, per-document sums (e.g. Σ‖Δ‖ over the document's tokens and its token count);
    den None means per-document values averaged over documents. The same resample of the U documents is used
    at every point (paired), which is what the slope's interval needs.
    """
    a = as_tensor(num, "num", torch.float64, ndim=2).cpu()
    b = torch.ones_like(a) if den is None else as_tensor(den, "den", torch.float64, ndim=2).cpu()
    if a.shape != b.shape:
        raise LorascopeError(f"num is {tuple(a.shape)} but den is {tuple(b.shape)}", fix="pass [points, documents]")
    if a.shape[1] < 2:
        raise LorascopeError(f"need >= 2 documents, got {a.shape[1]}", fix="pass per-document sums")
    w = resample_counts(a.shape[1], n_boot, seed)
    return a.sum(1) / b.sum(1), (w @ a.T) / (w @ b.T)


@functools.lru_cache(maxsize=_EXACT_MAX_POINTS)
def _all_permutations(P: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(P))))


def _permutation_slopes(x: torch.Tensor, y: torch.Tensor, n_perm: int, seed: int) -> torch.Tensor:
    P = x.numel()
    if P <= _EXACT_MAX_POINTS:
        perms = _all_permutations(P)
    else:
        g = torch.Generator().manual_seed(seed)
        perms = torch.stack([torch.randperm(P, generator=g) for _ in range(n_perm)])
    return ols_slope(x, y[perms])


def trend_test(
    x,
    values,
    samples=None,
    alpha: float = 0.05,
    expected: str | None = None,
    n_perm: int = 9999,
    seed: int = 0,
    ci_unit: str = "document",
) -> TrendTest:
    """Trend of ``values`` [P] over ``x`` [P] (e.g. log2 rank, or layer index).

    ``samples`` [B, P]: bootstrap replicates of the values under *paired* resamples (:func:`ratio_samples`, or
    columns of ``fvu_bootstrap_samples`` run with the same seed and documents); None gives no interval and the
    verdict can then only be "not testable here" or "does not hold". ``expected``: "increasing"/"decreasing"
    when the finding claims a direction (a significant slope the other way "does not hold").
    """
    xv = as_tensor(x, "x", torch.float64).reshape(-1).cpu()
    yv = as_tensor(values, "values", torch.float64).reshape(-1).cpu()
    if xv.numel() != yv.numel():
        raise LorascopeError(f"x has {xv.numel()} points but values has {yv.numel()}", fix="one value per point")
    if expected not in (None, "increasing", "decreasing"):
        raise LorascopeError(f"expected = {expected!r}", fix='use "increasing", "decreasing" or None')
    P = xv.numel()
    if P < 3 or float(xv.std()) == 0.0:
        return TrendTest(float("nan"), float("nan"), float("nan"), ci_unit, float("nan"), 1.0, P, "flat", NOT_TESTABLE)
    slope = float(ols_slope(xv, yv))
    perm = _permutation_slopes(xv, yv, n_perm, seed)
    tol = 1e-12 * max(abs(slope), 1e-300)
    exact = P <= _EXACT_MAX_POINTS
    hits = int((perm.abs() >= abs(slope) - tol).sum())
    p = hits / perm.numel() if exact else (1 + hits) / (1 + perm.numel())
    top = perm.abs().max()
    min_p = int((perm.abs() >= top - 1e-12 * float(top)).sum()) / perm.numel() if exact else 1 / (1 + perm.numel())
    lo = hi = float("nan")
    if samples is not None:
        s = as_tensor(samples, "samples", torch.float64, ndim=2).cpu()
        if s.shape[1] != P:
            raise LorascopeError(f"samples have {s.shape[1]} columns for {P} points", fix="pass [n_boot, P]")
        lo_t, hi_t = _percentiles(ols_slope(xv, s), alpha)
        lo, hi = float(lo_t), float(hi_t)
    direction = "increasing" if slope > 0 else ("decreasing" if slope < 0 else "flat")
    return TrendTest(
        slope, lo, hi, ci_unit, p, min_p, P, direction, _verdict(p, min_p, lo, hi, alpha, direction, expected)
    )


def _verdict(p: float, min_p: float, lo: float, hi: float, alpha: float, direction: str, expected: str | None) -> str:
    if min_p > alpha or math.isnan(lo) or math.isnan(hi):
        return NOT_TESTABLE
    significant = p <= alpha and (lo > 0 or hi < 0)
    if not significant:
        return "does not hold"
    return "holds" if expected in (None, direction) else "does not hold"


__all__ = ["NOT_TESTABLE", "TREND_VERDICTS", "TrendTest", "ols_slope", "ratio_samples", "trend_test"]
