"""Density of free-L0 SAEs at a fixed coefficient and at matched FVU (lorascope.saes.density)."""

from __future__ import annotations

import math

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.saes import TrainerConfig
from lorascope.saes.density import (
    DensityRun,
    DensitySpec,
    density_at_coefficient,
    density_at_matched_fvu,
    density_rows,
    search_matched_fvu,
)


def planted(n: int, active: int, seed: int, d: int = 32, n_features: int = 64) -> torch.Tensor:
    """Rows = sums of ``active`` random atoms (one fixed unit-norm dictionary) with magnitudes in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(123)
    atoms = torch.randn(n_features, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, n_features, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, n_features).scatter_(1, idx, 0.5 + torch.rand(n, active, generator=g))
    return coef @ atoms


SPEC = DensitySpec(
    d_sae=128, trainer=TrainerConfig(batch_size=128, lr=3e-2, warmup_steps=10, init_tokens=8192, log_every=100)
)


def analytic(c: float) -> DensityRun:
    """A known monotone curve: FVU = c / (1 + c), L0 = 10 / (1 + c)."""
    return DensityRun(c, c / (1 + c), 10 / (1 + c), 10 / (1 + c) / 100, 1.0, 0.0)


def test_search_brackets_then_bisects_to_the_known_coefficient():
    got = search_matched_fvu(analytic, 0.2, start=3.0, factor=4.0, max_runs=12, fvu_rtol=0.002)
    assert got.bracketed
    assert got.coefficient == pytest.approx(0.25, rel=0.01)  # c / (1 + c) = 0.2  <=>  c = 0.25
    assert got.l0 == pytest.approx(8.0, rel=0.005)
    fvus = [r.fvu for r in got.runs]
    assert fvus[0] > 0.2 and fvus[1] > 0.2 and fvus[2] < 0.2  # 3 -> 0.75 -> 0.1875: bracketed from above
    assert len(got.runs) <= 12
    assert min(abs(f - 0.2) for f in fvus) <= 0.002 * 0.2


def test_search_reports_an_unreachable_target_as_nan():
    got = search_matched_fvu(lambda c: analytic(c * 1e-9), 0.5, start=1.0, max_runs=4)
    assert not got.bracketed and math.isnan(got.l0) and len(got.runs) == 4
    rows = density_rows(None, got, 128, layer=3, adapter="r4", rank=4)
    assert [r.metric for r in rows] == ["l0_matched_fvu", "coefficient_matched_fvu"]
    assert "not bracketed" in rows[0].note and math.isnan(rows[0].value)


def test_density_needs_a_free_l0_sae():
    with pytest.raises(LorascopeError, match="TopK pins L0"):
        density_at_coefficient(torch.randn(64, 8), torch.randn(16, 8), 0.1, DensitySpec(d_sae=16, architecture="topk"))
    with pytest.raises(LorascopeError, match="target_fvu"):
        density_at_matched_fvu(torch.randn(64, 8), torch.randn(16, 8), 1.5, DensitySpec(d_sae=16))


def test_fixed_coefficient_density_does_not_depend_on_the_scale_of_delta():
    x, held = planted(8192, 3, seed=1), planted(1024, 3, seed=2)
    spec = DensitySpec(d_sae=128, trainer=TrainerConfig(batch_size=128, lr=3e-2, warmup_steps=10, init_tokens=8192))
    small = density_at_coefficient(x, held, 0.2, spec)
    large = density_at_coefficient(40.0 * x, 40.0 * held, 0.2, spec)  # Δ 40x larger: same SAE after σ-scaling
    assert large.l0 == pytest.approx(small.l0, rel=0.02)
    assert large.fvu == pytest.approx(small.fvu, rel=0.02)


def test_planted_denser_data_is_denser_at_matched_fvu():
    """Two active atoms per row vs six: at the same held-out FVU the six-atom data needs more latents."""
    sparse = density_at_matched_fvu(
        planted(32768, 2, 1), planted(2048, 2, 2), 0.1, SPEC, start=0.2, factor=3.0, max_runs=6, fvu_rtol=0.1
    )
    dense = density_at_matched_fvu(
        planted(32768, 6, 3), planted(2048, 6, 4), 0.1, SPEC, start=0.2, factor=3.0, max_runs=6, fvu_rtol=0.1
    )
    assert sparse.bracketed and dense.bracketed
    assert dense.l0 > 2.0 * sparse.l0
    assert 1.5 < sparse.l0 < 8.0  # near the planted 2 (ReLU-L1 spends a few extra latents)
    for m in (sparse, dense):
        near = m.nearest()
        assert abs(near.fvu - 0.1) < 0.05


def test_search_starts_at_the_architectures_default_coefficient(monkeypatch):
    import lorascope.saes.density as density

    tried: list[float] = []

    def fake(train, held_out, c, spec):
        tried.append(c)
        return analytic(c)

    monkeypatch.setattr(density, "density_at_coefficient", fake)
    x = torch.randn(8, 4)
    for arch, first in (("paper_a", 0.2), ("relu", 5.0), ("jumprelu", 1e-3)):
        tried.clear()
        got = density_at_matched_fvu(x, x, 0.1, DensitySpec(d_sae=8, architecture=arch), max_runs=8)
        assert tried[0] == first and got.bracketed, arch
