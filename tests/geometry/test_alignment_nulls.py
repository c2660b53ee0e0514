"""Alignment against the strongest null and the seed-vs-seed ceiling (A/A and random worlds)."""

import math

import pytest
import torch

from lorascope.geometry.bootstrap import unit_bootstrap_ci
from lorascope.geometry.cosine import best_match_cosines, mmcs
from lorascope.geometry.nulls import (
    AlignmentNulls,
    alignment_nulls,
    mmcs_null_isotropic,
    random_isotropic_dictionary,
    seed_ceiling,
)
from lorascope.geometry.verdicts import NOT_TESTABLE, alignment_verdict

F, D = 256, 48


def _noisy(W: torch.Tensor, seed: int, eps: float = 0.15) -> torch.Tensor:
    """W's atoms moved by small noise and shuffled (another "seed" of the same dictionary)."""
    g = torch.Generator().manual_seed(seed)
    out = W + eps * torch.randn(W.shape, generator=g) / math.sqrt(W.shape[1])
    return out[torch.randperm(W.shape[0], generator=g)]


def _verdict(adapter, reference, ceiling_pair, alive=None):
    cos = best_match_cosines(adapter, reference, alive_a=alive).cosine
    ci = unit_bootstrap_ci(cos, "atom", n_boot=500)
    nulls = alignment_nulls(
        adapter,
        reference,
        delta_cov=torch.eye(D),
        init_W=random_isotropic_dictionary(adapter.shape[0], D, seed=99),
        alive_adapter=alive,
    )
    ceiling = unit_bootstrap_ci(seed_ceiling(*ceiling_pair), "atom", n_boot=500)
    return alignment_verdict(ci.value, ci, nulls, ceiling), ci, nulls, ceiling


def test_aa_world_is_at_ceiling():
    truth = random_isotropic_dictionary(F, D, seed=1)
    verdict, ci, nulls, ceiling = _verdict(_noisy(truth, 2), _noisy(truth, 3), (_noisy(truth, 4), _noisy(truth, 5)))
    assert ci.value > 0.9 and ceiling.value > 0.9 and ci.ci_unit == "atom"
    assert verdict == "at ceiling"


def test_random_world_is_no_alignment():
    truth = random_isotropic_dictionary(F, D, seed=1)
    adapter = random_isotropic_dictionary(F, D, seed=7)
    verdict, ci, nulls, _ = _verdict(adapter, _noisy(truth, 3), (_noisy(truth, 4), _noisy(truth, 5)))
    assert verdict == "no alignment"
    assert ci.value == pytest.approx(nulls.isotropic, abs=0.03)
    assert nulls.isotropic == pytest.approx(mmcs_null_isotropic(F, D, exact=True))
    assert nulls.strongest >= max(nulls.isotropic, nulls.sae_init)


def test_covariance_matched_null_is_the_strongest_when_atoms_follow_the_data():
    g = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.full((4,), 10.0), torch.full((D - 4,), 0.3)])
    cov = torch.diag(scales**2)
    reference = torch.randn(F, D, generator=g) * scales  # atoms concentrated in Δ's top directions
    adapter = random_isotropic_dictionary(F, D, seed=3)
    nulls = alignment_nulls(adapter, reference, delta_cov=cov)
    assert nulls.cov_matched > nulls.isotropic + 0.2
    assert nulls.strongest == nulls.cov_matched and nulls.strongest_name == "cov_matched"
    assert math.isnan(nulls.sae_init)
    # a value that beats isotropic but not the covariance-matched null is "no alignment"
    mid = (nulls.isotropic + nulls.cov_matched) / 2
    assert alignment_verdict(mid, (mid - 0.01, mid + 0.01), nulls, ceiling=0.99) == "no alignment"
    # with a ceiling below that null (0.95) the same value is "not testable here": the test had no power
    assert alignment_verdict(mid, (mid - 0.01, mid + 0.01), nulls, ceiling=0.9) == NOT_TESTABLE


def test_alive_masks_change_the_null_size_and_the_ceiling():
    truth = random_isotropic_dictionary(F, D, seed=1)
    alive = torch.zeros(F, dtype=torch.bool)
    alive[: F // 4] = True
    assert alignment_nulls(truth, truth, alive_reference=alive).isotropic == pytest.approx(
        mmcs_null_isotropic(F // 4, D, exact=True)
    )
    c = seed_ceiling(truth, truth, alive, alive)
    assert c.numel() == F // 2 and float(c.mean()) == pytest.approx(1.0, abs=1e-6)
    assert mmcs(truth, truth, alive_a=alive).a_to_b == pytest.approx(1.0, abs=1e-6)


def test_verdict_rules():
    nulls = AlignmentNulls(0.2, 0.25, float("nan"))
    assert alignment_verdict(0.3, (0.24, 0.36), nulls, 0.6) == "no alignment"  # CI reaches the strongest null
    assert alignment_verdict(0.4, (0.35, 0.45), nulls, 0.6) == "weak"
    assert alignment_verdict(0.55, (0.5, 0.62), nulls, 0.6) == "at ceiling"
    assert alignment_verdict(0.7, (0.65, 0.75), nulls, 0.45) == "at ceiling"  # above the ceiling (A/A case)
    assert alignment_verdict(0.4, (float("nan"), float("nan")), nulls, 0.6) == NOT_TESTABLE
    # no power: the ceiling is not above the strongest null, so "no alignment" cannot be concluded
    assert alignment_verdict(0.2, (0.18, 0.22), nulls, 0.25) == NOT_TESTABLE
    assert alignment_verdict(0.2, (0.18, 0.22), nulls, (0.22, 0.3)) == NOT_TESTABLE
    assert alignment_verdict(0.2, (0.18, 0.22), nulls, None) == "no alignment"  # no ceiling: the plain rule
    assert alignment_verdict(0.4, (0.35, 0.45), {"isotropic": 0.2}, None) == "weak"
    ceiling_ci = unit_bootstrap_ci([0.5, 0.55, 0.6, 0.52], "seed", n_boot=200)
    assert alignment_verdict(0.49, (0.45, 0.51), nulls, ceiling_ci) == "at ceiling"  # overlaps the ceiling's CI


def test_seed_vs_seed_rows_use_alive_atoms():
    from lorascope.geometry.compare import seed_vs_seed

    truth = random_isotropic_dictionary(F, D, seed=1)
    dead_rows = random_isotropic_dictionary(F, D, seed=2)
    seed0 = torch.cat([truth[:64], dead_rows[:192]])  # 64 learned atoms, 192 dead (random) rows
    seed1 = torch.cat([_noisy(truth[:64], 4, eps=0.05), random_isotropic_dictionary(192, D, seed=3)])
    alive = torch.zeros(F, dtype=torch.bool)
    alive[:64] = True
    all_atoms = seed_vs_seed(seed0, seed1, "adapter")[0]
    alive_only = seed_vs_seed(seed0, seed1, "adapter", alive_0=alive, alive_1=alive)[0]
    assert alive_only.value > 0.95 > 0.6 > all_atoms.value and "alive atoms" in alive_only.note
    assert alive_only.value == pytest.approx(float(seed_ceiling(seed0, seed1, alive, alive).mean()), abs=1e-6)


def test_null_world_calibration_over_seeds():
    """An adapter dictionary that knows only Δ's covariance, against a reference whose atoms follow Δ's top
    directions: without the covariance-matched null it would read as alignment; with it, "no alignment"."""
    scales = torch.cat([torch.full((6,), 6.0), torch.full((D - 6,), 0.5)])
    cov = torch.diag(scales**2)
    not_no = weak_without_cov = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(1000 + seed)
        reference = torch.randn(F, D, generator=g) * scales
        adapter = torch.randn(F // 2, D, generator=g) * scales  # a "covariance-only" adapter dictionary
        ci = unit_bootstrap_ci(best_match_cosines(adapter, reference).cosine, "atom", n_boot=300, seed=seed)
        nulls = alignment_nulls(adapter, reference, delta_cov=cov, seed=seed)
        not_no += alignment_verdict(ci.value, ci, nulls, ceiling=0.99) != "no alignment"
        weak_without_cov += alignment_verdict(ci.value, ci, {"isotropic": nulls.isotropic}, 0.99) == "weak"
    assert not_no <= 2  # <= 10% of 20 seeds read as aligned
    assert weak_without_cov >= 18  # the isotropic null alone would call almost every seed "weak"
