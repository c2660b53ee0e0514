"""Closed-form latent scaling on constructed activations with known β."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry.latent_scaling import LatentScaling, closed_form_betas


def _world(seed=0, n=200, d=12, F=5):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    decoder = q[:F] * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64).unsqueeze(1)  # orthogonal rows
    codes = torch.rand(n, F, generator=g, dtype=torch.float64) * (torch.rand(n, F, generator=g) < 0.4)
    codes[:, 4] = 0.0  # latent 4 never fires
    return codes, decoder, q, g


def test_known_betas_recovered_exactly_with_orthogonal_decoder():
    codes, decoder, q, g = _world()
    beta_ft = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    beta_base = torch.tensor([0.2, 1.0, 1.7, 0.0, 1.0], dtype=torch.float64)
    orth_noise = torch.randn(200, 7, generator=g, dtype=torch.float64) @ q[5:]  # outside the decoder's span
    h_ft = (codes * beta_ft) @ decoder + orth_noise
    h_base = (codes * beta_base) @ decoder + orth_noise
    ls = LatentScaling(decoder.float())
    ls.update(codes[:120], ft=h_ft[:120], base=h_base[:120])
    ls.update(codes[120:], ft=h_ft[120:], base=h_base[120:])  # streaming over two batches
    b = ls.betas()
    torch.testing.assert_close(b["base"][:4], beta_base[:4], rtol=0, atol=1e-6)
    torch.testing.assert_close(b["ft"][:4], beta_ft[:4], rtol=0, atol=1e-6)
    assert torch.isnan(b["base"][4]) and ls.count_active[4] == 0
    table = ls.table()
    assert table["latent"].tolist()[:4] == [3, 0, 1, 2]  # strengthened most (ratio 0) first, weakened last
    assert np.isnan(table["ratio"].iloc[-1])
    torch.testing.assert_close(closed_form_betas(codes, decoder, h_base)[:4], beta_base[:4], rtol=0, atol=1e-9)


def test_beta_is_the_least_squares_minimiser():
    codes, decoder, _, g = _world(seed=1)
    y = torch.randn(200, 12, generator=g, dtype=torch.float64)  # arbitrary target: β minimises the residual
    beta = closed_form_betas(codes, decoder, y)
    j = 1

    def loss(b):
        return float(((y - b * codes[:, j : j + 1] * decoder[j]) ** 2).sum())

    assert loss(float(beta[j])) <= min(loss(float(beta[j]) + e) for e in (-1e-3, 1e-3))


def test_bad_shapes_fail_clearly():
    ls = LatentScaling(torch.randn(3, 4))
    with pytest.raises(LorascopeError, match="targets"):
        ls.update(torch.rand(2, 3), ft=torch.randn(2, 4))
    with pytest.raises(LorascopeError, match="codes must be"):
        ls.update(torch.rand(2, 5), ft=torch.randn(2, 4), base=torch.randn(2, 4))
    with pytest.raises(LorascopeError, match="target 'base'"):
        ls.update(torch.rand(2, 3), ft=torch.randn(2, 4), base=torch.randn(3, 4))
