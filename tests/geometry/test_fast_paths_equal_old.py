"""The geometry stage's faster paths give the numbers of the code they replaced.

Each test keeps a frozen copy of the replaced computation (the straightforward loop) and checks the new path
against it on random data: bit for bit where the same floating-point operations run in the same order
(selection-aware overlap, covariance-matched nulls, subspace summaries, CKA value and biased CKA), to float64
rounding where only the order of a sum changed (the CKA permutation null reads the centred Gram re-indexed
instead of re-centring each permuted Gram).
"""

import math

import pytest
import torch

from lorascope.geometry.cka import (
    _ratio,
    center_gram,
    cka_permutation_null,
    gram_linear,
    linear_cka,
    linear_cka_both,
)
from lorascope.geometry.cosine import mmcs
from lorascope.geometry.nulls import alignment_nulls, covariance_matched_dictionary
from lorascope.geometry.subspaces import (
    _gaussian_rows,
    _isotropic_rows,
    orthonormal_rows,
    pca_basis,
    principal_angles,
    projection_energy,
    random_subspace_null,
    selection_aware_overlap,
    selection_aware_overlap_on,
    selection_split,
    split_documents,
    subspace_summary,
    top_k_atoms,
)


def _world(seed: int = 0, n_docs: int = 24, per_doc: int = 25, d: int = 48):
    """Anisotropic Δ [N, d] in documents, and two dictionaries of different sizes."""
    g = torch.Generator().manual_seed(seed)
    n = n_docs * per_doc
    delta = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d)
    delta += torch.randn(n_docs, d, generator=g, dtype=torch.float64)[torch.arange(n) // per_doc]
    W1 = torch.randn(200, d, generator=g)
    W2 = torch.randn(137, d, generator=g)
    return delta, torch.arange(n) // per_doc, W1, W2


# ---- frozen copies of the replaced code ------------------------------------------------------------------------


def _old_summary(A, B) -> dict[str, float]:
    theta = principal_angles(A, B)
    ka, kb = orthonormal_rows(A, "A").shape[0], orthonormal_rows(B, "B").shape[0]
    return {
        "mean_cos2": float((torch.cos(theta) ** 2).mean()),
        "largest_angle": float(theta[-1]),
        "smallest_angle": float(theta[0]),
        "n_angles": float(theta.numel()),
        "null_mean_cos2": random_subspace_null(ka, kb, A.shape[1]),
    }


def _old_overlap_with(W_dec, D_sel, basis, k):
    return _old_summary(top_k_atoms(W_dec, projection_energy(W_dec, D_sel), k), basis)["mean_cos2"]


def _old_selection_aware_overlap(W_dec, delta, doc_ids, k, n_draws, seed):
    W = W_dec.to(torch.float64)
    D = delta.to(torch.float64)
    sel = split_documents(doc_ids, seed)
    Da, basis = D[sel], pca_basis(D[~sel], k)
    value = _old_overlap_with(W, Da, basis, k)
    F, d = W.shape
    S = torch.cov(Da.T)
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    roots = {"isotropic": torch.eye(d, dtype=torch.float64), "cov": V * lam.clamp_min(0.0).sqrt()}
    iso = [
        _old_overlap_with(_gaussian_rows(F, roots["isotropic"], seed * 7919 + 2 * r + 1), Da, basis, k)
        for r in range(n_draws)
    ]
    cm = [
        _old_overlap_with(_gaussian_rows(F, roots["cov"], seed * 7919 + 2 * r + 2), Da, basis, k)
        for r in range(n_draws)
    ]
    ti, tc = torch.tensor(iso), torch.tensor(cm)
    q = lambda t: float(torch.quantile(t, 0.95))  # noqa: E731
    return (value, float(ti.mean()), q(ti), float(tc.mean()), q(tc))


def _old_covariance_matched(F, cov, seed):
    S = cov.to(torch.float64)
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    root = V * lam.clamp_min(0.0).sqrt()
    w = torch.randn(F, S.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ root.T
    return (w / w.norm(dim=1, keepdim=True)).to(torch.float32)


def _old_null_values(X, Y, design, n_perm, seed, debiased=True):
    """The replaced permutation loop: re-centre the permuted Gram every time."""
    Xb, Yb = X[design.reshape(-1)], Y[design.reshape(-1)]
    Kc = center_gram(gram_linear(Xb - Xb.mean(0)), debiased)
    L = gram_linear(Yb - Yb.mean(0))
    kk = float((Kc * Kc).sum())
    blocks = torch.arange(design.numel()).reshape(design.shape)
    gen = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(n_perm):
        ry = blocks[torch.randperm(design.shape[0], generator=gen)].reshape(-1)
        Lc = center_gram(L[ry][:, ry], debiased)
        null.append(_ratio(float((Kc * Lc).sum()), kk, float((Lc * Lc).sum())))
    return torch.tensor(null, dtype=torch.float64)


# ---- the checks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("F,d,seed", [(2304, 576, 21), (200, 48, 1), (37, 5, 9)])
def test_isotropic_rows_skip_the_identity_product_bit_for_bit(F, d, seed):
    assert torch.equal(_isotropic_rows(F, d, seed), _gaussian_rows(F, torch.eye(d, dtype=torch.float64), seed))


@pytest.mark.parametrize("n,d,seed", [(6000, 576, 0), (1500, 576, 1), (200, 48, 4), (97, 48, 5), (60, 48, 6)])
def test_pca_basis_equals_the_full_svd_of_the_centred_data(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, d) + 5.0
    old = torch.linalg.svd(X - X.mean(0), full_matrices=False)[2][:8]
    assert torch.equal(pca_basis(X, 8), old)


def test_subspace_summary_equals_the_old_two_pass_version():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randn(8, 40, generator=g, dtype=torch.float64)
    A[5] = A[0] + A[1]  # rank 5: the rank comes from the same orthonormalisation
    assert subspace_summary(A, B) == _old_summary(A, B)


@pytest.mark.parametrize("seed", [0, 4])
def test_selection_aware_overlap_equals_the_old_loop_exactly(seed):
    delta, docs, W1, W2 = _world(seed)
    for W in (W1, W2, W1.double()):
        new = selection_aware_overlap(W, delta, docs, 5, n_draws=6, seed=seed)
        assert (new.value, new.isotropic_mean, new.isotropic_q95, new.cov_matched_mean, new.cov_matched_q95) == (
            _old_selection_aware_overlap(W, delta, docs, 5, 6, seed)
        )


def test_one_split_serves_several_dictionaries():
    delta, docs, W1, W2 = _world(2)
    split = selection_split(delta, docs, 4, seed=7)
    for W in (W1, W2):
        assert selection_aware_overlap_on(W, split, n_draws=5) == selection_aware_overlap(
            W, delta, docs, 4, n_draws=5, seed=7
        )


def test_covariance_matched_null_computes_the_root_once_same_draws():
    delta, _, W1, W2 = _world(5)
    cov = torch.cov(delta.T)
    for seed in (0, 1009, 2019):
        new = covariance_matched_dictionary(150, cov=cov, seed=seed)
        assert torch.equal(new, _old_covariance_matched(150, cov, seed))
    alive = torch.arange(W1.shape[0]) % 3 != 0
    nulls = alignment_nulls(W1, W2, delta_cov=cov, alive_adapter=alive, seed=3)
    n_a = int(alive.sum())
    old = [mmcs(_old_covariance_matched(n_a, cov, 3 * 1009 + r), W2).a_to_b for r in range(3)]
    assert nulls.cov_matched == float(torch.tensor(old, dtype=torch.float64).numpy().mean())


def test_linear_cka_both_is_the_two_single_calls():
    delta, _, _, _ = _world(6)
    X, Y = delta[:, :20], delta[:, 10:] ** 2
    assert linear_cka_both(X, Y) == (linear_cka(X, Y, debiased=True), linear_cka(X, Y))


@pytest.mark.parametrize("debiased", [True, False])
def test_permutation_null_equals_re_centring_every_permuted_gram(debiased):
    delta, docs, _, _ = _world(8, n_docs=12, per_doc=20)
    X = delta[:, :30]
    Y = 0.3 * X[:, :12] + torch.randn(X.shape[0], 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = cka_permutation_null(X, Y, docs, n_perm=40, seed=5, debiased=debiased)
    design = torch.arange(X.shape[0]).reshape(12, 20)  # equal-length documents: every one kept, in row order
    old = _old_null_values(X, Y, design, 40, 5, debiased)
    assert res.value == linear_cka(X, Y, debiased)
    assert res.null_mean == pytest.approx(float(old.mean()), rel=1e-12, abs=1e-15)
    assert res.null_q95 == pytest.approx(float(torch.quantile(old, 0.95)), rel=1e-12, abs=1e-15)
    assert res.p_value == (1 + int((old >= res.tested_value).sum())) / 41
    assert not math.isnan(res.tested_value)
