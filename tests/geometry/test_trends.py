"""Trend verdicts over rank/depth: too few points is "not testable here", noise rarely "holds"."""

import math

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry.trends import NOT_TESTABLE, ols_slope, ratio_samples, trend_test


def _per_doc(slope: float, n_points: int, seed: int, noise: float = 0.05, n_docs: int = 40):
    """Per-point, per-document values: level = slope * point + document effect + noise."""
    g = torch.Generator().manual_seed(seed)
    doc_effect = torch.randn(n_docs, generator=g, dtype=torch.float64)
    x = torch.arange(n_points, dtype=torch.float64)
    vals = (
        slope * x[:, None]
        + 0.3 * doc_effect[None, :]
        + noise * torch.randn(n_points, n_docs, generator=g, dtype=torch.float64)
    )
    return x, vals


def test_four_ranks_are_never_testable():
    x = torch.log2(torch.tensor([4.0, 8.0, 16.0, 32.0]))
    _, vals = _per_doc(1.0, 4, seed=0)
    point, samples = ratio_samples(vals, n_boot=300)
    t = trend_test(x, point, samples)
    assert t.min_p == pytest.approx(2 / 24) and t.p_value == pytest.approx(2 / 24)  # perfectly monotone
    assert t.ci_low > 0  # the interval alone would have said "holds"
    assert t.verdict == NOT_TESTABLE and t.direction == "increasing" and t.ci_unit == "document"


def test_clear_trend_over_eight_points_holds_and_direction_is_checked():
    x, vals = _per_doc(0.5, 8, seed=1)
    point, samples = ratio_samples(vals, n_boot=300)
    t = trend_test(x, point, samples, expected="increasing")
    assert t.verdict == "holds" and t.p_value <= 2 / math.factorial(8) + 1e-12
    assert t.slope == pytest.approx(float(ols_slope(x, point)))
    assert trend_test(x, point, samples, expected="decreasing").verdict == "does not hold"
    assert trend_test(x, point, None).verdict == NOT_TESTABLE  # no interval, no claim


def test_null_world_rarely_holds():
    holds = 0
    for seed in range(40):
        x, vals = _per_doc(0.0, 8, seed=100 + seed, noise=0.2)
        point, samples = ratio_samples(vals, n_boot=200, seed=seed)
        holds += trend_test(x, point, samples).verdict == "holds"
    assert holds <= 4  # level 0.05: expected <= 2 of 40 (both the permutation p and the CI must agree)


def test_monotone_points_with_wide_document_interval_do_not_hold():
    x = torch.arange(8, dtype=torch.float64)
    point = 0.01 * x  # perfectly ordered: permutation p is minimal
    g = torch.Generator().manual_seed(3)
    samples = point + torch.randn(400, 8, generator=g, dtype=torch.float64)  # measurement noise >> the trend
    t = trend_test(x, point, samples)
    assert t.p_value == pytest.approx(t.min_p) and t.ci_low < 0 < t.ci_high
    assert t.verdict == "does not hold"


def test_ratio_samples_and_bad_inputs():
    num = torch.tensor([[2.0, 4.0], [3.0, 3.0]])
    den = torch.tensor([[1.0, 3.0], [2.0, 1.0]])
    point, samples = ratio_samples(num, den, n_boot=50)
    assert point.tolist() == pytest.approx([6 / 4, 6 / 3]) and samples.shape == (50, 2)
    assert trend_test([1, 2], [0.1, 0.2]).verdict == NOT_TESTABLE
    with pytest.raises(LorascopeError, match="one value per point"):
        trend_test([1, 2, 3], [0.1, 0.2])
    with pytest.raises(LorascopeError, match="expected"):
        trend_test([1, 2, 3], [0.1, 0.2, 0.3], expected="up")
