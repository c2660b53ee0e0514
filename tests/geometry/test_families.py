"""Feature families across ranks/seeds: null threshold, permutation recovery, split detection, stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry.families import match_families, random_match_threshold, rank_by_stability, seed_stability


def _unit(n, d, seed):
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return W / W.norm(dim=1, keepdim=True)


def test_null_threshold_matches_monte_carlo():
    d, f = 32, 50
    t = random_match_threshold(d, f, quantile=0.9)  # per-atom 90% quantile of the max cosine to 50 atoms
    maxes = np.array([float((_unit(1, d, 1000 + s) @ _unit(f, d, s).T).max()) for s in range(2000)])
    assert np.mean(maxes <= t) == pytest.approx(0.9, abs=0.02)
    assert random_match_threshold(d, f, n_tested=100) > random_match_threshold(d, f)  # family-wise is stricter
    with pytest.raises(LorascopeError, match="null parameters"):
        random_match_threshold(1, 5)


def test_permuted_noisy_copy_recovers_the_permutation():
    A = _unit(40, 24, 0)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    B = A[perm] + 0.05 * torch.randn(40, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fm = match_families(A, B)
    inv = torch.argsort(perm)  # A[i] sits at row inv[i] of B
    assert fm.table["b"].tolist() == inv.tolist()
    assert fm.counts() == {"persistent": 40, "split": 0, "specific": 0}
    assert (fm.table["cosine"] > fm.threshold).all()


def test_random_dictionaries_match_nothing():
    for seed in range(5):
        fm = match_families(_unit(60, 64, seed), _unit(80, 64, 100 + seed))
        assert fm.counts()["persistent"] == 0 and fm.counts()["split"] == 0
        assert fm.counts()["specific"] == 60


def test_split_and_specific_labels_and_alive_masks():
    A = _unit(6, 48, 3)
    g = torch.Generator().manual_seed(4)
    # B: atom 0 of A split into two children; atoms 1..3 copied; atoms 4, 5 absent; plus random atoms
    child = [A[0] + 0.6 * _unit(1, 48, 9)[0], A[0] - 0.6 * _unit(1, 48, 9)[0]]
    B = torch.cat(
        [torch.stack(child), A[1:4] + 0.01 * torch.randn(3, 48, generator=g, dtype=torch.float64), _unit(5, 48, 11)]
    )
    fm = match_families(A, B)
    labels = dict(zip(fm.table["a"], fm.table["label"], strict=True))
    assert labels == {0: "split", 1: "persistent", 2: "persistent", 3: "persistent", 4: "specific", 5: "specific"}
    alive = torch.tensor([True, True, False, True, True, True])
    fm2 = match_families(A, B, alive_a=alive)
    assert 2 not in fm2.table["a"].tolist() and len(fm2.table) == 5


def test_seed_stability_and_ranking():
    ref = _unit(10, 32, 0)
    noisy = [ref + 0.05 * _unit(10, 32, s) for s in (1, 2)]
    half = ref.clone()
    half[5:] = _unit(5, 32, 7)  # a third seed reproduces only the first 5 atoms
    stab = seed_stability(ref, [*noisy, half])
    assert stab.loc[:4].tolist() == [1.0] * 5
    assert stab.loc[5:].tolist() == pytest.approx([2 / 3] * 5)
    energy = torch.arange(10, dtype=torch.float64)
    ranked = rank_by_stability(stab, energy)
    # scores: features 0..4 -> 1·i; features 5..9 -> (2/3)·i = 3.3, 4, 4.7, 5.3, 6
    assert ranked["feature"].tolist()[:3] == [9, 8, 7]
    torch.testing.assert_close(
        torch.tensor(ranked["score"].to_numpy()[:3]), torch.tensor([6.0, 16 / 3, 14 / 3], dtype=torch.float64)
    )
    assert np.all(np.diff(ranked["score"].to_numpy()) <= 0)
    with pytest.raises(LorascopeError, match="at least one other"):
        seed_stability(ref, [])
