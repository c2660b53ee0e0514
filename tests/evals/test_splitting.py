"""k-sparse probing and the splitting count (evals/splitting.py), SAEBench rules: grow k while F1 improves by
more than 0.03; the count includes the main latent (1 = no split)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorascope.evals.first_letter import LETTERS
from lorascope.evals.probe import LogisticProbe
from lorascope.evals.splitting import (
    balanced_probe,
    decoder_rows,
    k_sparse_splitting,
    normalised_codes,
    split_count,
)


def test_split_count_rule():
    assert split_count([0.5, 0.9, 0.91]) == 2  # 0.91 is not > 0.9 + 0.03
    assert split_count([0.9, 0.95, 0.99, 0.2, 1.0]) == 3  # stops at the first non-improvement
    assert split_count([0.5, 0.5299]) == 1
    assert split_count([0.5, 0.5301]) == 2
    assert split_count([0.0, 0.0]) == 1  # k = 1 always beats the -100 start
    assert split_count([0.6, 0.7], f1_jump_threshold=0.2) == 1


def _codes(n_per_letter: int, split_letter: int | None, seed: int):
    """Latent c fires (value ~1-2) on letter c's words; latents 26..29 are noise firing at random. With
    ``split_letter``, that letter's words alternate between its own latent and latent 30."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(26).repeat_interleave(n_per_letter)
    codes = torch.zeros(len(labels), 31)
    codes[torch.arange(len(labels)), labels] = 1.0 + torch.rand(len(labels), generator=g)
    codes[:, 26:30] = (torch.rand(len(labels), 4, generator=g) < 0.3) * torch.rand(len(labels), 4, generator=g)
    if split_letter is not None:
        rows = torch.nonzero(labels == split_letter).flatten()[1::2]
        codes[rows, 30] = codes[rows, split_letter]
        codes[rows, split_letter] = 0.0
    return codes, labels


def test_one_perfect_latent_per_letter_is_no_split():
    xtr, ytr = _codes(20, None, seed=0)
    xte, yte = _codes(8, None, seed=1)
    res = k_sparse_splitting(xtr, ytr, xte, yte)
    for c, letter in enumerate(LETTERS):
        assert res[letter].f1_by_k[0] == 1.0
        assert res[letter].main_latents == [c] and res[letter].splitting_k == 1


def test_feature_split_across_two_latents_counts_two():
    b = LETTERS.index("b")
    xtr, ytr = _codes(20, b, seed=0)
    xte, yte = _codes(8, b, seed=1)
    res = k_sparse_splitting(xtr, ytr, xte, yte, letters=[0, b])
    assert res["b"].splitting_k == 2 and sorted(res["b"].main_latents) == [b, 30]
    assert res["b"].f1_by_k[0] == pytest.approx(2 * 0.5 / 1.5)  # one half of the positives, no false positives
    assert res["b"].f1_by_k[1] == 1.0
    assert res["a"].splitting_k == 1


def test_balanced_probe_is_the_sklearn_optimum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g)
    y = x[:, 0] + 0.8 * torch.randn(300, generator=g) > 0.7
    w, b = balanced_probe(x, y)
    # gradient of ½‖w‖² + Σ s_i logloss_i vanishes at the optimum (s = N / (2 · class count))
    xd, yd = x.double(), y.double()
    s = torch.where(y, 300 / (2 * yd.sum()), 300 / (2 * (1 - yd).sum()))
    r = s * (torch.sigmoid(xd @ w.double() + b.double()) - yd)
    assert float((w.double() + xd.T @ r).abs().max()) < 1e-4 and abs(float(r.sum())) < 1e-4
    # the multi-column probe fits each column as its own balanced problem: column 0 is the same optimum
    probe = LogisticProbe(c=1.0).fit(x, torch.stack([y, ~y], 1))
    torch.testing.assert_close(probe.weight[0], w, atol=1e-4, rtol=0)
    torch.testing.assert_close(probe.weight[1], -w, atol=1e-4, rtol=0)  # the complement flips the sign
    assert probe.predict(x)[:, 0].tolist() == (x @ w + b > 0).tolist()


def test_normalised_codes_fold_decoder_norms():
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(6, 4, generator=g)
    enc = torch.randn(4, 6, generator=g)
    sae = SimpleNamespace(W_dec=w_dec, encode=lambda x: torch.relu(x @ enc))
    x = torch.randn(5, 4, generator=g)
    unit, norms = decoder_rows(sae)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(6))
    codes = normalised_codes(sae, x)
    torch.testing.assert_close(codes @ unit, sae.encode(x) @ w_dec)  # same reconstruction
    torch.testing.assert_close(codes, sae.encode(x) * norms)
