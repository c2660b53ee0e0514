"""Null dictionaries, the analytic MMCS null, and bootstrap intervals."""

import math

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import (
    bootstrap_ci,
    bootstrap_fvu_ci,
    bootstrap_ratio_ci,
    covariance_matched_dictionary,
    fvu,
    mmcs,
    mmcs_null_empirical,
    mmcs_null_isotropic,
    overlap_null_isotropic,
    random_isotropic_dictionary,
)
from lorascope.geometry.bootstrap import _counts


def test_random_dictionary_mmcs_vs_asymptotic_and_exact():
    d, F_A, F_B = 512, 512, 4096
    emp, _ = mmcs_null_empirical(F_A, F_B, d, seed=0)
    asym = mmcs_null_isotropic(F_B, d)
    assert asym == pytest.approx(math.sqrt(2 * math.log(F_B) / d))
    # √(2 ln F / d) overestimates (Gaussian extreme-value correction): ~13% here, within 15%
    assert 0.85 * asym < emp < asym
    assert emp == pytest.approx(mmcs_null_isotropic(F_B, d, exact=True), rel=0.02)
    emp_abs, _ = mmcs_null_empirical(F_A, F_B, d, seed=1, absolute=True)
    assert emp_abs == pytest.approx(mmcs_null_isotropic(F_B, d, exact=True, absolute=True), rel=0.02)


def test_reference_golden_null_value():
    # shared/REFERENCE.md: "0.066 mean for d=3584, F=16k" — the exact expectation
    assert mmcs_null_isotropic(16384, 3584, exact=True) == pytest.approx(0.066, abs=0.001)


def test_overlap_null_matches_simulation():
    d, F_B, tau = 64, 256, 0.35
    A, B = random_isotropic_dictionary(2000, d, seed=2), random_isotropic_dictionary(F_B, d, seed=3)
    best = (A.double() @ B.double().T).max(1).values
    assert float((best >= tau).double().mean()) == pytest.approx(overlap_null_isotropic(tau, F_B, d), abs=0.03)


def test_random_dictionaries_shapes_and_norms():
    W = random_isotropic_dictionary(100, 16, seed=0)
    assert W.shape == (100, 16) and W.dtype == torch.float32
    torch.testing.assert_close(W.norm(dim=1), torch.ones(100))
    assert torch.equal(W, random_isotropic_dictionary(100, 16, seed=0))
    # covariance-matched: directions concentrate along Σ's top eigenvector
    cov = torch.diag(torch.tensor([100.0] + [1.0] * 15, dtype=torch.float64))
    C = covariance_matched_dictionary(500, cov=cov, seed=1)
    torch.testing.assert_close(C.norm(dim=1), torch.ones(500))
    top = torch.linalg.eigh(C.double().T @ C.double())[1][:, -1]
    assert abs(float(top[0])) > 0.99
    X = torch.randn(300, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * torch.sqrt(cov.diag())
    assert covariance_matched_dictionary(10, data=X).shape == (10, 16)
    with pytest.raises(LorascopeError, match="exactly one"):
        covariance_matched_dictionary(10)
    assert mmcs(C, C).a_to_b == pytest.approx(1.0, abs=1e-6)


def test_bootstrap_ci_mean():
    rng = np.random.default_rng(0)
    v = rng.normal(size=2000) * 2 + 1
    ci = bootstrap_ci(v, n_boot=1000, seed=3)
    assert ci.value == pytest.approx(v.mean())
    assert ci.low < ci.value < ci.high
    half = 1.96 * v.std() / math.sqrt(len(v))
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(v, n_boot=1000, seed=3) == ci  # deterministic
    med = bootstrap_ci(v, stat=np.median, n_boot=100, seed=0)
    assert med.low < med.value < med.high
    with pytest.raises(LorascopeError, match="alpha"):
        bootstrap_ci(v, alpha=1.5)


def test_bootstrap_ratio_ci():
    rng = np.random.default_rng(1)
    num, den = rng.random(500), rng.random(500) + 1
    ci = bootstrap_ratio_ci(num, den, n_boot=300, seed=0)
    assert ci.value == pytest.approx(num.sum() / den.sum()) and ci.low < ci.value < ci.high


def test_bootstrap_fvu_recentres_on_the_resample():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64) + 10
    xh = x + 0.5 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    err, sq = ((x - xh) ** 2).sum(1), (x * x).sum(1)
    (one,) = bootstrap_fvu_ci(err, sq, x, n_boot=1, seed=7)
    assert one.value == pytest.approx(fvu(x, xh), rel=1e-12)
    w = _counts(50, 1, torch.Generator().manual_seed(7))[0].long()  # the same first resample
    idx = torch.repeat_interleave(torch.arange(50), w)
    assert one.low == pytest.approx(fvu(x[idx], xh[idx]), rel=1e-10)  # denominator about the resample's mean
    # grouped units (block bootstrap) give the same point estimate
    groups = torch.arange(50) // 5
    gs = lambda t: torch.zeros(10, *t.shape[1:], dtype=t.dtype).index_add_(0, groups, t)  # noqa: E731
    (blk,) = bootstrap_fvu_ci(gs(err), gs(sq), gs(x), torch.full((10,), 5.0), n_boot=50)
    assert blk.value == pytest.approx(fvu(x, xh), rel=1e-12) and blk.low <= blk.value <= blk.high
