"""FVU / MSE golden properties (shared/REFERENCE.md: μ is the dataset mean; predicting μ gives exactly 1)."""

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import ReconstructionStats, fvu, mse


def test_fvu_of_predicting_the_mean_is_exactly_one():
    # small integers, power-of-two N: every sum and the mean are exact in float64, so FVU == 1 bit for bit
    x = torch.randint(-8, 9, (64, 5), generator=torch.Generator().manual_seed(0)).double()
    mu = x.mean(0, keepdim=True).expand_as(x)
    assert fvu(x, mu) == 1.0
    # random real data: 1 up to rounding
    g = np.random.default_rng(1)
    y = g.normal(size=(300, 7)) * 3 + 5
    assert fvu(y, np.broadcast_to(y.mean(0), y.shape)) == pytest.approx(1.0, abs=1e-12)


def test_perfect_reconstruction_gives_zero():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    assert fvu(x, x) == 0.0
    assert mse(x, x) == 0.0


def test_mean_about_zero_is_not_used():
    # data far from the origin: predicting 0 must not look good just because of a big mean
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 100
    assert fvu(x, torch.zeros_like(x)) > 1000


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(257, 9, generator=g, dtype=torch.float64) * 2 + 3
    xh = x + 0.3 * torch.randn(257, 9, generator=g, dtype=torch.float64)
    s = ReconstructionStats()
    for i in range(0, 257, 40):
        s.update(x[i : i + 40], xh[i : i + 40])
    assert s.fvu == pytest.approx(fvu(x, xh), rel=1e-12)
    assert s.mse == pytest.approx(mse(x, xh), rel=1e-12)
    direct = float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert s.fvu == pytest.approx(direct, rel=1e-12)


def test_nan_input_is_a_clear_error():
    x = torch.ones(3, 2)
    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(LorascopeError, match="NaN"):
        fvu(x, bad)
