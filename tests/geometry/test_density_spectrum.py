"""Streaming covariance, effective rank, density histograms, delta-norm summaries."""

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import (
    DeltaNormStats,
    StreamingCovariance,
    density_histogram,
    mean_active_features,
    n_components_for_variance,
    participation_ratio,
    spectrum_rows,
)


def test_streaming_covariance_equals_numpy_far_from_origin():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1001, 7)) @ rng.normal(size=(7, 7)) + 1e4
    acc = StreamingCovariance()
    for i in range(0, 1001, 128):
        acc.update(X[i : i + 128])
    np.testing.assert_allclose(acc.mean.numpy(), X.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.cov().numpy(), np.cov(X.T), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acc.cov(ddof=0).numpy(), np.cov(X.T, ddof=0), rtol=1e-9, atol=1e-9)
    # merging two halves equals streaming everything
    a, b = StreamingCovariance().update(X[:500]), StreamingCovariance().update(X[500:])
    np.testing.assert_allclose(a.merge(b).cov().numpy(), acc.cov().numpy(), rtol=1e-12, atol=1e-12)
    lam = acc.eigvals().numpy()
    np.testing.assert_allclose(lam, np.sort(np.linalg.eigvalsh(np.cov(X.T)))[::-1], rtol=1e-9)
    top = acc.top_components(2)
    assert top.shape == (2, 7)
    with pytest.raises(LorascopeError, match="width"):
        acc.update(X[:, :3])


def test_effective_rank_on_known_spectra():
    assert participation_ratio([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert participation_ratio([3.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert participation_ratio([2.0, 1.0]) == pytest.approx(9 / 5)
    assert n_components_for_variance([5, 3, 1, 1], 0.9) == 3
    assert n_components_for_variance([5, 3, 1, 1], 0.99) == 4
    assert n_components_for_variance([1, 3, 5, 1], 0.5) == 1  # sorted internally


def test_rank_r_delta_has_participation_ratio_near_r():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(32, 3, generator=g, dtype=torch.float64))[0].T
    D = torch.randn(3000, 3, generator=g, dtype=torch.float64) @ basis  # isotropic inside a 3-D subspace
    acc = StreamingCovariance().update(D)
    rows = {r.metric: r.value for r in spectrum_rows(acc, "delta", layer=4)}
    assert rows["participation_ratio_delta"] == pytest.approx(3.0, rel=0.05)
    assert rows["n_components_99_delta"] == 3


def test_density_histogram_and_l0():
    h = density_histogram([0.0, 1e-3, 1e-3, 0.5, 1.0, 1e-12], n_bins=8, log10_min=-8)
    assert h["dead"] == 1 and h["counts"].sum() == 5
    assert h["counts"][0] == 1  # 1e-12 is clipped into the first bin
    assert h["edges"][0] == -8 and h["edges"][-1] == 0
    codes = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert mean_active_features(codes) == 1.5
    with pytest.raises(LorascopeError, match="fractions"):
        density_histogram([2.0])


def test_delta_norm_stats():
    hb = torch.zeros(100, 4, dtype=torch.float64)
    hb[:, 0] = 10.0
    hf = hb.clone()
    hf[:, 1] = torch.arange(1, 101, dtype=torch.float64)  # ||Δ_t|| = t
    s = DeltaNormStats()
    s.update(hb[:60], hf[:60])
    s.update(hb[60:], hf[60:])
    out = s.summary()
    assert out["delta_norm"]["mean"] == pytest.approx(50.5)
    assert out["delta_norm"]["median"] == pytest.approx(50.5)
    assert out["delta_norm"]["p99"] == pytest.approx(np.quantile(np.arange(1, 101), 0.99))
    assert out["relative_delta_norm"]["mean"] == pytest.approx(5.05)
    rows = s.rows(layer=1)
    assert len(rows) == 8 and all(r.family == "delta_norm" and r.n == 100 and r.d == 4 for r in rows)
