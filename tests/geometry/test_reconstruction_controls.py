"""Reconstruction of held-out deltas against controls, on constructed data where the answer is known."""

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import DeltaReconstruction, ReconstructionOptions, delta_reconstruction, lstsq_on_active_atoms


class IdentitySAE:
    """Identity codes on the standard basis, decode = codes @ W_dec: reconstructs everything exactly."""

    def __init__(self, d):
        self.W_dec = torch.eye(d, dtype=torch.float64)

    def encode(self, x):
        return x.clone()

    def decode(self, codes):
        return codes @ self.W_dec


class ThresholdSAE:
    """A JumpReLU-like SAE on the standard basis with a bias: small inputs stay below threshold -> b_dec."""

    def __init__(self, d, threshold, b_dec):
        self.W_dec = torch.eye(d, dtype=torch.float64)
        self.threshold, self.b_dec = threshold, b_dec

    def encode(self, x):
        return x * (x.abs() > self.threshold)

    def decode(self, codes):
        return codes @ self.W_dec + self.b_dec


def _pair(n=400, d=8, seed=0, delta_mean=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hb = torch.randn(n, d, generator=g, dtype=torch.float64) * 5 + 2
    delta = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + delta_mean
    return hb, hb + delta


def _by_metric(rows):
    return {r.metric: r for r in rows}


def test_identity_sae_reconstructs_everything():
    hb, hf = _pair()
    rows = _by_metric(
        delta_reconstruction(hb, hf, IdentitySAE(8), IdentitySAE(8), ReconstructionOptions(batch_size=64), layer=5)
    )
    for m in ("adapter_sae", "ref_sae_on_delta", "ref_sae_difference", "ref_active_lstsq"):
        assert rows[f"fvu_{m}"].value == pytest.approx(0.0, abs=1e-20)
        assert rows[f"cosine_{m}"].value == pytest.approx(1.0, abs=1e-12)
        assert rows[f"fvu_{m}"].layer == 5 and rows[f"fvu_{m}"].family == "reconstruction"
    assert rows["l0_ref_active_lstsq"].value == 8  # every coordinate of h_ft is active


def test_noise_control_fvu_is_two_for_mean_zero_delta():
    # E||Δ - n||² = 2||Δ||² for a random direction n with ||n|| = ||Δ||;
    # so FVU -> 2 Σ||Δ||² / Σ||Δ - μ||² = 2 when μ = 0
    hb, hf = _pair(n=4000, d=16, seed=1)
    acc = DeltaReconstruction(IdentitySAE(16), seed=3)
    for i in range(0, 4000, 1000):
        acc.update(hb[i : i + 1000], hf[i : i + 1000])
    noise = _by_metric(acc.rows())["fvu_isotropic_noise"]
    assert noise.value == pytest.approx(2.0, rel=0.02)
    assert noise.null_value == pytest.approx(2.0, rel=0.01)  # analytic expectation on this data
    assert abs(_by_metric(acc.rows())["cosine_isotropic_noise"].value) < 0.02


def test_noise_control_matches_its_expectation_for_biased_delta():
    hb, hf = _pair(n=4000, d=16, seed=2, delta_mean=0.7)
    acc = DeltaReconstruction(IdentitySAE(16), seed=0)
    acc.update(hb, hf)
    expected = acc.noise_fvu_expectation()
    assert expected > 2.3  # a mean offset makes it larger than 2
    assert _by_metric(acc.rows())["fvu_isotropic_noise"].value == pytest.approx(expected, rel=0.02)


def test_threshold_sae_on_small_deltas_returns_bias_but_controls_do_not():
    d = 8
    hb, hf = _pair(n=300, d=d, seed=4, scale=0.01)
    sae = ThresholdSAE(d, threshold=0.5, b_dec=torch.full((d,), 0.3, dtype=torch.float64))
    rows = _by_metric(delta_reconstruction(hb, hf, sae))
    assert rows["fvu_ref_sae_on_delta"].value > 100  # outputs b_dec: far worse than predicting the mean
    assert rows["l0_ref_sae_on_delta"].value == 0
    assert rows["fvu_ref_active_lstsq"].value < rows["fvu_ref_sae_on_delta"].value
    assert rows["fvu_ref_sae_on_delta"].null_name == "mean_predictor" and rows["fvu_ref_sae_on_delta"].null_value == 1.0


def test_lstsq_on_active_atoms_matches_numpy_per_token():
    rng = np.random.default_rng(5)
    F, d, n = 12, 6, 30
    W = rng.normal(size=(F, d))
    W[7] = W[3] * 2 + W[4]  # a collinear atom
    delta = rng.normal(size=(n, d))
    active = rng.random((n, F)) < 0.3
    active[0] = False  # no active atom -> zero
    active[1] = True  # 12 atoms in R^6: rank deficient, exact fit
    active[2] = False
    active[2, [3, 4, 7]] = True  # collinear set
    out = lstsq_on_active_atoms(delta, W, active).numpy()
    for t in range(n):
        S = W[active[t]]
        expect = np.zeros(d) if len(S) == 0 else S.T @ np.linalg.lstsq(S.T, delta[t], rcond=None)[0]
        np.testing.assert_allclose(out[t], expect, atol=1e-9)
    np.testing.assert_allclose(out[1], delta[1], atol=1e-9)


def test_bootstrap_interval_and_bad_inputs():
    hb, hf = _pair(n=200, d=8, seed=6)
    sae = ThresholdSAE(8, threshold=1.0, b_dec=torch.zeros(8, dtype=torch.float64))
    rows = _by_metric(delta_reconstruction(hb, hf, sae, None, ReconstructionOptions(n_boot=200, seed=1)))
    r = rows["fvu_ref_sae_on_delta"]
    assert r.ci_low < r.value < r.ci_high
    with pytest.raises(LorascopeError, match="d_in"):
        delta_reconstruction(hb, hf, IdentitySAE(7))
    with pytest.raises(LorascopeError, match="tokens"):
        delta_reconstruction(hb, hf[:10], IdentitySAE(8), None, ReconstructionOptions(batch_size=1000))
    with pytest.raises(LorascopeError, match="encode"):
        DeltaReconstruction(object())
    bad = hf.clone()
    bad[3, 3] = float("inf")
    with pytest.raises(LorascopeError, match="NaN or inf"):
        delta_reconstruction(hb, bad, IdentitySAE(8))


class ZeroSAE:
    """Predicts Δ̂ = 0 for every token (worse than the mean predictor when Δ has a mean)."""

    def __init__(self, d):
        self.W_dec = torch.eye(d, dtype=torch.float64)

    def encode(self, x):
        return torch.zeros_like(x)

    def decode(self, codes):
        return codes @ self.W_dec


def test_document_bootstrap_matches_the_pure_function_and_documents_span_batches():
    from lorascope.geometry.bootstrap import document_bootstrap_fvu_ci

    hb, hf = _pair(n=240, d=8, seed=7, delta_mean=0.5)
    doc = torch.arange(240) // 12
    ref = ThresholdSAE(8, threshold=0.8, b_dec=torch.zeros(8, dtype=torch.float64))
    rows = _by_metric(
        delta_reconstruction(hb, hf, ref, None, ReconstructionOptions(batch_size=50, seed=2, n_boot=300), doc_ids=doc)
    )
    delta = hf - hb
    err = ((delta - ref.decode(ref.encode(delta))) ** 2).sum(1)
    (ci,) = document_bootstrap_fvu_ci(err, delta, doc, n_boot=300, seed=2)
    r = rows["fvu_ref_sae_on_delta"]
    assert r.extra["ci_unit"] == "document" and ci.ci_unit == "document"
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)  # batches of 50 split documents
    with pytest.raises(LorascopeError, match="doc_ids"):
        DeltaReconstruction(ref, bootstrap="document").update(hb, hf)


def test_gap_to_best_control_and_verdict():
    from lorascope.geometry.verdicts import reconstruction_verdict

    hb, hf = _pair(n=240, d=8, seed=8, delta_mean=0.5)
    doc = torch.arange(240) // 12
    ref = ThresholdSAE(8, threshold=0.8, b_dec=torch.zeros(8, dtype=torch.float64))
    good = _by_metric(delta_reconstruction(hb, hf, ref, IdentitySAE(8), ReconstructionOptions(n_boot=300), doc_ids=doc))
    gap = good["fvu_gap_adapter_sae_vs_best_control"]
    best = gap.extra["best_control"]
    assert best in ("ref_sae_difference", "ref_active_lstsq")
    assert gap.value == pytest.approx(-good[f"fvu_{best}"].value) and gap.ci_high < 0
    fvu_ad = good["fvu_adapter_sae"]
    assert fvu_ad.null_value == 1.0 and fvu_ad.null_name == "mean_predictor"
    assert reconstruction_verdict((gap.ci_low, gap.ci_high), (fvu_ad.ci_low, fvu_ad.ci_high)) == "holds"
    bad = _by_metric(delta_reconstruction(hb, hf, ref, ZeroSAE(8), ReconstructionOptions(n_boot=300), doc_ids=doc))
    gap, fvu_ad = bad["fvu_gap_adapter_sae_vs_best_control"], bad["fvu_adapter_sae"]
    assert fvu_ad.value > 1  # predicting 0 for a biased Δ is worse than the mean
    assert reconstruction_verdict((gap.ci_low, gap.ci_high), (fvu_ad.ci_low, fvu_ad.ci_high)) == "does not hold"
