"""CKA golden properties (Kornblith et al. 2019) and the streaming accumulator."""

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import (
    StreamingLinearCKA,
    cka_from_grams,
    gram_linear,
    gram_rbf,
    linear_cka,
    rbf_cka,
)


def _data(n=60, d1=12, d2=9, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d1, generator=g, dtype=torch.float64) + offset
    Y = X @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + 2 * torch.randn(
        n, d2, generator=g, dtype=torch.float64
    )
    return X, Y


@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_is_one(debiased):
    X, _ = _data()
    assert linear_cka(X, X, debiased) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariance_orthogonal_and_isotropic_scaling(debiased):
    X, Y = _data()
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    base = linear_cka(X, Y, debiased)
    assert linear_cka(X @ Q * 3.7, Y, debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(X + 5.0, Y * 0.01, debiased) == pytest.approx(base, abs=1e-12)
    rb = rbf_cka(X, Y, debiased=debiased)
    assert rbf_cka(X @ Q * 3.7, Y, debiased=debiased) == pytest.approx(rb, abs=1e-10)
    # not invariant to anisotropic scaling (sanity: the test above can fail)
    assert abs(linear_cka(X * torch.linspace(0.1, 10, 12, dtype=torch.float64), Y, debiased) - base) > 1e-3


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_and_feature_space_agree(debiased):
    X, Y = _data(n=40, offset=3.0)
    assert linear_cka(X, Y, debiased) == pytest.approx(
        cka_from_grams(gram_linear(X), gram_linear(Y), debiased), abs=1e-12
    )


def test_debiased_removes_small_sample_bias():
    # independent Gaussians, N=20 << d=100: biased CKA ~0.84 every time; debiased is 0 in expectation with a
    # per-draw spread of ~0.07 (measured over 200 seeds), so test the mean over 20 draws (SE ~0.017)
    biased, debiased = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(20, 100, generator=g, dtype=torch.float64)
        Y = torch.randn(20, 100, generator=g, dtype=torch.float64)
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert min(biased) > 0.7
    assert abs(np.mean(debiased)) < 0.06
    assert max(abs(v) for v in debiased) < 0.3


@pytest.mark.parametrize("debiased", [False, True])
def test_streaming_equals_in_memory(debiased):
    X, Y = _data(n=203, offset=1e3)  # far from the origin: exercises the shift/centring numerics
    acc = StreamingLinearCKA()
    for i in range(0, 203, 37):
        acc.update(X[i : i + 37].numpy(), Y[i : i + 37])
    assert acc.value(debiased) == pytest.approx(linear_cka(X, Y, debiased), abs=1e-10)


def test_rbf_bandwidth_is_fraction_of_median_distance():
    X, _ = _data(n=9)
    K = gram_rbf(X, bandwidth=0.5)
    D2 = torch.cdist(X, X) ** 2
    sigma2 = 0.25 * float(np.median(D2.numpy()))
    torch.testing.assert_close(K, torch.exp(-D2 / (2 * sigma2)), atol=1e-10, rtol=0)


def test_bad_inputs():
    X, Y = _data(n=3)
    with pytest.raises(LorascopeError, match="at least 4"):
        linear_cka(X, Y, debiased=True)
    with pytest.raises(LorascopeError, match="at least 4"):
        rbf_cka(X, Y, debiased=True)
    with pytest.raises(LorascopeError, match="rows"):
        linear_cka(X, Y[:2])
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LorascopeError, match="NaN"):
        linear_cka(bad, Y)
    with pytest.raises(LorascopeError, match="variance"):
        linear_cka(torch.ones(5, 3), torch.randn(5, 2))
    acc = StreamingLinearCKA()
    acc.update(X, Y)
    with pytest.raises(LorascopeError, match="at least 4"):
        acc.value(debiased=True)
    with pytest.raises(LorascopeError, match="widths"):
        acc.update(X[:, :5], Y)
