"""Planted-feature generator (evals/synthetic.py): exact truth, orthonormal bases, exact sparsity, seeds."""

from __future__ import annotations

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.evals.synthetic import PlantedConfig, PlantedFeatures


def test_samples_are_exactly_the_sum_of_their_stated_features():
    gen = PlantedFeatures(PlantedConfig(d=20, n_features=9, dims=(1, 2, 3, 4), active=3, seed=4))
    b = gen.sample(200, seed=1)
    assert b.x.shape == (200, 20) and b.active.shape == (200, 3) and b.coords.shape == (200, 3, 4)
    for n in range(200):
        rebuilt = torch.zeros(20, dtype=torch.float64)
        for j, f in enumerate(b.active[n].tolist()):
            di = gen.bases[f].shape[0]
            rebuilt += b.coords[n, j, :di].double() @ gen.bases[f]
            assert float(b.coords[n, j, di:].abs().sum()) == 0  # padding stays zero
        torch.testing.assert_close(b.x[n].double(), rebuilt, rtol=0, atol=1e-6)
    assert float(b.noise.abs().sum()) == 0


def test_bases_orthonormal_dims_mixture_and_exact_sparsity():
    cfg = PlantedConfig(d=16, n_features=10, dims=(1, 3), active=4, seed=0)
    gen = PlantedFeatures(cfg)
    assert gen.dims.tolist() == [1, 3] * 5
    for b, di in zip(gen.bases, gen.dims.tolist(), strict=True):
        assert b.shape == (di, 16)
        torch.testing.assert_close(b @ b.T, torch.eye(di, dtype=torch.float64), rtol=0, atol=1e-12)
    batch = gen.sample(500, seed=2)
    pres = batch.presence(10)
    assert pres.sum(1).eq(4).all()  # exactly 4 distinct features per sample
    assert torch.equal(batch.active, batch.active.sort(1).values)
    # magnitude |N(0,1)| + 0.5 ≥ 0.5
    assert float(batch.coords.norm(dim=-1).min()) >= 0.5 - 1e-6


def test_determinism_by_seed():
    cfg = PlantedConfig(d=12, n_features=6, dims=(1, 2), active=2, seed=3, noise=0.1)
    a, b = PlantedFeatures(cfg), PlantedFeatures(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.bases, b.bases, strict=True))
    assert torch.equal(a.sample(50, seed=9).x, b.sample(50, seed=9).x)
    assert not torch.equal(a.sample(50, seed=9).x, a.sample(50, seed=10).x)
    other = PlantedFeatures(PlantedConfig(d=12, n_features=6, dims=(1, 2), active=2, seed=4))
    assert not torch.equal(a.bases[0], other.bases[0])
    it1, it2 = a.batches(8, n_batches=3, seed=5), b.batches(8, n_batches=3, seed=5)
    xs = list(it1)
    assert len(xs) == 3 and all(torch.equal(x, y) for x, y in zip(xs, it2, strict=True))
    assert not torch.equal(xs[0], xs[1])


def test_noise_and_zipf_frequencies():
    gen = PlantedFeatures(PlantedConfig(d=64, n_features=8, dims=(2,), active=1, noise=0.5, seed=0))
    b = gen.sample(4000, seed=0)
    assert abs(float(b.noise.std()) - 0.5) < 0.01
    clean = PlantedFeatures(PlantedConfig(d=64, n_features=8, dims=(2,), active=1, noise=0.0, seed=0))
    torch.testing.assert_close(b.x - b.noise, clean.sample(4000, seed=0).x, rtol=0, atol=1e-5)
    zipf = PlantedFeatures(PlantedConfig(d=8, n_features=5, dims=(1,), active=1, frequency="zipf", seed=0))
    freq = zipf.sample(20000, seed=1).presence(5).double().mean(0)
    expect = 1.0 / torch.arange(1, 6, dtype=torch.float64)
    torch.testing.assert_close(freq, expect / expect.sum(), rtol=0, atol=0.01)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(active=11), "active=11"),
        (dict(dims=(0, 2)), "dims"),
        (dict(frequency="pareto"), "frequency"),
        (dict(noise=-1.0), "noise"),
    ],
)
def test_bad_configs_are_rejected(kw, msg):
    with pytest.raises(LorascopeError, match=msg):
        PlantedFeatures(PlantedConfig(d=8, n_features=10, **kw))
