"""Principal angles between rank-k subspaces of R^d, the selectors that produce such subspaces, and their
null.

Inputs are *rows as directions* ([k, d], like W_dec); everything runs in float64. Angles are in radians,
smallest first, and computed like ``scipy.linalg.subspace_angles``: cosines from the SVD of Q_Aᵀ Q_B, and, for
angles with cos² >= 1/2, sines from the SVD of the part of the smaller subspace orthogonal to the larger one
(arccos loses all precision below ~1e-8 rad; the sine form stays accurate at 1e-9 rad and below).

Null: for uniformly random subspaces of dimensions k1 <= k2 in R^d, E[P_B] = (k2/d)·I, so
E[sum cos² θ_i] = E tr(P_A P_B) = k1·k2/d and, with min(k1, k2) = k1 angles, E[mean cos²] = max(k1, k2)/d
(= k/d for k1 = k2 = k). Exact in expectation, not an asymptotic.

Principal angles between overcomplete dictionaries are meaningless (16k atoms span R^d: all angles are 0), so
k >= d on both sides is refused, as is any k > d; compare top-k selections instead.
"""

from __future__ import annotations

import math

import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor, same_dim
from lorascope.results import ResultRow


def orthonormal_rows(M, name: str = "M", rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis [rank, d] (float64) of the row space of ``M`` [k, d]; rank by scipy.linalg.orth's
    rule."""
    M = as_tensor(M, name, torch.float64, ndim=2)
    if M.shape[0] == 0:
        raise LorascopeError(f"{name} has no rows", fix="pass at least one direction")
    _, s, vh = torch.linalg.svd(M, full_matrices=False)
    tol = (rtol if rtol is not None else max(M.shape) * torch.finfo(torch.float64).eps) * (
        s[0] if s.numel() else 0
    )
    rank = int((s > tol).sum())
    if rank == 0:
        raise LorascopeError(f"{name} is all zeros", fix="pass non-zero directions")
    return vh[:rank]


def _check_sizes(A: torch.Tensor, B: torch.Tensor) -> None:
    (k1, d), (k2, _) = A.shape, B.shape
    if k1 >= d and k2 >= d:
        raise LorascopeError(
            f"principal angles between two full-span sets of directions (k = {k1} and {k2} >= d = {d}) are "
            "all zero by construction: both span R^d",
            fix="compare rank-k subspaces with k < d (top_k_atoms, pca_basis, lora_column_space)",
        )
    for name, k in (("A", k1), ("B", k2)):
        if k > d:
            raise LorascopeError(
                f"{name} has k = {k} directions in R^{d}; a subspace has at most d",
                fix="select k < d directions (top_k_atoms or pca_basis)",
            )


def principal_angles(A, B) -> torch.Tensor:
    """Principal angles [min(rank A, rank B)] in radians, smallest first, between row spaces of A [k1,d], B
    [k2,d]."""
    A = as_tensor(A, "A", torch.float64, ndim=2)
    B = as_tensor(B, "B", torch.float64, ndim=2)
    same_dim(A, B, "A", "B")
    _check_sizes(A, B)
    QA, QB = orthonormal_rows(A, "A"), orthonormal_rows(B, "B")
    if QA.shape[0] < QB.shape[0]:
        QA, QB = QB, QA  # QA: the larger subspace; QB: the smaller one (its dimension = number of angles)
    C = QB @ QA.T  # [kb, ka]
    cos = torch.linalg.svdvals(C).clamp(-1.0, 1.0)  # descending -> angles ascending
    residual = QB - C @ QA  # component of the smaller subspace orthogonal to the larger one
    sin = torch.linalg.svdvals(residual).clamp(-1.0, 1.0).flip(0)  # ascending -> angles ascending
    theta = torch.where(cos**2 >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return theta


def top_k_atoms(W_dec, score, k: int) -> torch.Tensor:
    """Rows [k, d] of ``W_dec`` [F, d] with the largest ``score`` [F] (density, Δ-variance explained, …).

    Ties are broken by the lower index. Refuses k > d (a subspace of R^d has at most d dimensions).
    """
    W = as_tensor(W_dec, "W_dec", ndim=2)
    s = as_tensor(score, "score", torch.float64).reshape(-1)
    if s.shape[0] != W.shape[0]:
        raise LorascopeError(
            f"score has {s.shape[0]} entries but W_dec has {W.shape[0]} atoms", fix="pass one score per atom"
        )
    _check_k(k, W.shape[1], W.shape[0])
    order = torch.argsort(-s, stable=True)[:k]
    return W[order.to(W.device)]


def _check_k(k: int, d: int, available: int) -> None:
    if k < 1 or k > d:
        raise LorascopeError(f"k = {k} is not a subspace dimension of R^{d}", fix=f"choose 1 <= k <= {d}")
    if k > available:
        raise LorascopeError(
            f"k = {k} but only {available} directions are available", fix=f"choose k <= {available}"
        )


def atom_energy(codes, W_dec) -> torch.Tensor:
    """Per-atom share of reconstruction energy [F]: sum_t (c_ti ‖w_i‖)² / total (a Δ-variance-explained
    score)."""
    c = as_tensor(codes, "codes", torch.float64, ndim=2)
    W = as_tensor(W_dec, "W_dec", torch.float64, ndim=2)
    if c.shape[1] != W.shape[0]:
        raise LorascopeError(
            f"codes have {c.shape[1]} latents but W_dec has {W.shape[0]} atoms",
            fix="use codes from the same SAE",
        )
    e = (c * c).sum(0) * (W * W).sum(1)
    total = e.sum()
    return e / total if total > 0 else e


def pca_basis(X, k: int) -> torch.Tensor:
    """Top-k principal directions [k, d] (float64, rows) of X [N, d] about its mean (for large N use
    ``StreamingCovariance.top_components``)."""
    X = as_tensor(X, "X", torch.float64, ndim=2)
    _check_k(k, X.shape[1], min(X.shape[0], X.shape[1]))
    Xc = X - X.mean(0)
    _, _, vh = torch.linalg.svd(Xc, full_matrices=False)
    return vh[:k]


def lora_column_space(B, A, rtol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis [rank, d_out] (float64, rows) of the column space of the LoRA update B·A.

    B [d_out, r], A [r, d_in]. Never forms B·A: B = Q R (thin QR), B·A = Q (R A), SVD of the small r x d_in
    matrix R·A gives U; the basis is Q U restricted to singular values > rtol·s_max (rank of B·A).
    """
    B = as_tensor(B, "lora_B", torch.float64, ndim=2)
    A = as_tensor(A, "lora_A", torch.float64, ndim=2)
    if B.shape[1] != A.shape[0]:
        raise LorascopeError(
            f"lora_B is {tuple(B.shape)} but lora_A is {tuple(A.shape)}: ranks differ",
            fix="pass B [d_out, r] and A [r, d_in] of the same adapter module",
        )
    Q, R = torch.linalg.qr(B)
    U, s, _ = torch.linalg.svd(R @ A, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        raise LorascopeError(
            "the LoRA update B·A is zero (B = 0 at initialisation?)",
            fix="use a trained adapter, or init_lora_weights=False in tests",
        )
    rank = int((s > rtol * s[0]).sum())
    return (Q @ U[:, :rank]).T.contiguous()


def random_subspace_null(k1: int, k2: int, d: int) -> float:
    """E[mean cos² θ] for uniformly random k1- and k2-dim subspaces of R^d: max(k1, k2)/d."""
    return max(k1, k2) / d


def subspace_summary(A, B) -> dict[str, float]:
    """Principal-angle summary: mean cos², largest and smallest angle (rad), number of angles, and the
    null."""
    A = as_tensor(A, "A", torch.float64, ndim=2)
    B = as_tensor(B, "B", torch.float64, ndim=2)
    theta = principal_angles(A, B)
    ka, kb = orthonormal_rows(A, "A").shape[0], orthonormal_rows(B, "B").shape[0]
    return {
        "mean_cos2": float((torch.cos(theta) ** 2).mean()),
        "largest_angle": float(theta[-1]),
        "smallest_angle": float(theta[0]),
        "n_angles": float(theta.numel()),
        "null_mean_cos2": random_subspace_null(ka, kb, A.shape[1]),
    }


def compare_subspaces(A, B, name: str, layer: int = -1, adapter: str = "", rank: int = -1) -> list[ResultRow]:
    """Tidy rows (family "subspace") for the principal angles between row spaces of A and B."""
    s = subspace_summary(A, B)
    d = as_tensor(A, "A", ndim=2).shape[1]
    n = int(s["n_angles"])
    common = dict(family="subspace", layer=layer, adapter=adapter, rank=rank, n=n, d=d, dtype="float64")
    return [
        ResultRow(
            metric=f"mean_cos2_{name}",
            value=s["mean_cos2"],
            null_value=s["null_mean_cos2"],
            null_name="random_subspace",
            note="E[mean cos²] = max(k1,k2)/d for random subspaces",
            **common,
        ),
        ResultRow(metric=f"largest_angle_deg_{name}", value=math.degrees(s["largest_angle"]), **common),
        ResultRow(metric=f"smallest_angle_deg_{name}", value=math.degrees(s["smallest_angle"]), **common),
    ]


__all__ = [
    "atom_energy",
    "compare_subspaces",
    "lora_column_space",
    "orthonormal_rows",
    "pca_basis",
    "principal_angles",
    "random_subspace_null",
    "subspace_summary",
    "top_k_atoms",
]
