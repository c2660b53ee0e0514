"""Principal angles (vs scipy, tiny angles), selectors, LoRA column space, the k/d null, refusals."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import (
    compare_subspaces,
    lora_column_space,
    orthonormal_rows,
    pca_basis,
    principal_angles,
    random_subspace_null,
    subspace_summary,
    top_k_atoms,
)


@pytest.mark.parametrize("k1,k2,d", [(3, 5, 10), (5, 3, 10), (4, 4, 12), (1, 7, 9), (6, 6, 40)])
def test_matches_scipy_subspace_angles(k1, k2, d):
    rng = np.random.default_rng(k1 * 100 + k2 * 10 + d)
    A, B = rng.normal(size=(k1, d)), rng.normal(size=(k2, d))
    ours = principal_angles(A, B).numpy()
    ref = scipy.linalg.subspace_angles(A.T, B.T)[::-1]  # scipy: columns are directions, largest angle first
    np.testing.assert_allclose(ours, ref, atol=1e-10, rtol=0)
    assert np.all(np.diff(ours) >= 0)


def test_intersecting_subspaces_give_exact_zeros():
    # two 4-dim subspaces of R^6 share >= 2 dimensions: two angles are exactly 0. (scipy 1.17 returns ~3e-8
    # here because its sine/cosine mask is indexed in the opposite order to its angles; we use the sine.)
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    theta = principal_angles(A, B).numpy()
    assert theta[0] < 1e-14 and theta[1] < 1e-14 and theta[2] > 1e-3


@pytest.mark.parametrize("t", [1e-9, 1e-12, 1e-5])
def test_tiny_known_angle_is_accurate(t):
    d = 50
    Q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(d, d)))  # random rotation of the ambient space
    A = Q[:3]
    B = np.stack([Q[0], Q[1] * math.cos(t) + Q[5] * math.sin(t), Q[2]]) * np.array([[2.0], [0.5], [3.0]])
    theta = principal_angles(A, B).numpy()
    assert theta[-1] == pytest.approx(t, rel=1e-6)
    assert theta[0] < 1e-14 and theta[1] < 1e-14


def test_refusals():
    rng = np.random.default_rng(2)
    with pytest.raises(LorascopeError, match="at most d"):
        principal_angles(rng.normal(size=(9, 8)), rng.normal(size=(3, 8)))
    with pytest.raises(LorascopeError, match="all zero by construction"):
        principal_angles(rng.normal(size=(64, 8)), rng.normal(size=(32, 8)))
    with pytest.raises(LorascopeError, match="dimension"):
        principal_angles(rng.normal(size=(2, 8)), rng.normal(size=(2, 7)))
    with pytest.raises(LorascopeError, match="k = 9"):
        top_k_atoms(rng.normal(size=(20, 8)), rng.random(20), k=9)
    with pytest.raises(LorascopeError, match="zero"):
        lora_column_space(np.zeros((6, 2)), rng.normal(size=(2, 5)))


def test_random_subspace_null_max_k_over_d():
    d, reps = 20, 80
    rng = np.random.default_rng(3)
    for k1, k2 in [(4, 4), (3, 6)]:
        vals = [
            float((torch.cos(principal_angles(rng.normal(size=(k1, d)), rng.normal(size=(k2, d)))) ** 2).mean())
            for _ in range(reps)
        ]
        assert np.mean(vals) == pytest.approx(random_subspace_null(k1, k2, d), abs=0.035)
    assert random_subspace_null(4, 4, 20) == 4 / 20


def test_selectors():
    rng = np.random.default_rng(4)
    W = rng.normal(size=(30, 10))
    score = rng.random(30)
    top = top_k_atoms(W, score, 4)
    np.testing.assert_array_equal(top.numpy(), W[np.argsort(-score, kind="stable")[:4]])
    # PCA: data on a planted 2-D subspace plus tiny noise, far from the origin
    basis = np.linalg.qr(rng.normal(size=(10, 2)))[0].T
    X = rng.normal(size=(500, 2)) * [5.0, 3.0] @ basis + 1e-4 * rng.normal(size=(500, 10)) + 50
    P = pca_basis(X, 2)
    assert principal_angles(P, basis).max() < 1e-3
    torch.testing.assert_close(P @ P.T, torch.eye(2, dtype=torch.float64))


def test_lora_column_space_without_forming_product():
    rng = np.random.default_rng(5)
    B = rng.normal(size=(40, 4))
    A = rng.normal(size=(3, 25))
    A = np.concatenate([A, A[:1] + A[1:2]])  # rank(A) = 3, so rank(BA) = 3 < r = 4
    Q = lora_column_space(B, A)
    assert Q.shape == (3, 40)
    torch.testing.assert_close(Q @ Q.T, torch.eye(3, dtype=torch.float64))
    U = np.linalg.svd(B @ A)[0][:, :3]
    assert principal_angles(Q, U.T).max() < 1e-10


def test_summary_and_rows():
    rng = np.random.default_rng(6)
    A = rng.normal(size=(3, 30))
    s = subspace_summary(A, A * 2)
    assert s["mean_cos2"] == pytest.approx(1.0) and s["largest_angle"] < 1e-12
    assert s["null_mean_cos2"] == pytest.approx(3 / 30)
    rows = compare_subspaces(A, rng.normal(size=(5, 30)), "top3_vs_pca5", layer=2)
    assert rows[0].null_value == pytest.approx(5 / 30) and rows[0].family == "subspace"
    assert orthonormal_rows(np.concatenate([A, A[:1]])).shape[0] == 3
