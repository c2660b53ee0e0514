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

Selection bias: atoms selected by their energy on Δ and then compared with PCA(Δ) score far above k/d even for a
*random* dictionary (selection picks the random atoms closest to Δ's top directions). :func:`selection_aware_overlap`
selects on one half of the documents, measures on the other, and runs the identical selection on random
isotropic and covariance-matched dictionaries to obtain the null (the permutation/"same pipeline on null data"
logic of Good 2005, applied to the selection step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
    tol = (rtol if rtol is not None else max(M.shape) * torch.finfo(torch.float64).eps) * (s[0] if s.numel() else 0)
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
    return _angles_and_ranks(A, B)[0]


def _angles_and_ranks(A, B, QB: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """(principal angles, rank A, rank B) from one orthonormalisation of each side; ``QB``: B's orthonormal rows
    when the caller already has them (as :func:`orthonormal_rows` gives them)."""
    A = as_tensor(A, "A", torch.float64, ndim=2)
    B = as_tensor(B, "B", torch.float64, ndim=2)
    same_dim(A, B, "A", "B")
    _check_sizes(A, B)
    QA = orthonormal_rows(A, "A")
    QB = orthonormal_rows(B, "B") if QB is None else QB
    return _angles(QA, QB), QA.shape[0], QB.shape[0]


def _angles(QA: torch.Tensor, QB: torch.Tensor) -> torch.Tensor:
    """Principal angles between the row spaces of orthonormal QA [ka, d] and QB [kb, d] (float64)."""
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
        raise LorascopeError(f"k = {k} but only {available} directions are available", fix=f"choose k <= {available}")


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
    if Xc.shape[0] >= 2 * Xc.shape[1]:
        # tall: LAPACK's gesdd reduces X = QR first and takes V from the SVD of R; doing that here skips forming
        # Q and U [N, d] (half the time) and gives the same V bit for bit (tests/geometry/test_fast_paths_*)
        Xc = torch.linalg.qr(Xc, mode="r")[1]
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
    theta, ka, kb = _angles_and_ranks(A, B)
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


# --------------------------------------------------------------------------------------------------------------
# Selection-aware overlap: select on one half of the documents, measure on the other, against selected nulls
# --------------------------------------------------------------------------------------------------------------


def projection_energy(W_dec, X) -> torch.Tensor:
    """Per-atom energy of X [N, d] along each unit atom of W_dec [F, d]: Σ_t (x_t · ŵ_i)² [F] (float64).

    Needs only the directions, so the same selection runs on SAE decoders and on random null dictionaries.
    """
    W = as_tensor(W_dec, "W_dec", torch.float64, ndim=2)
    Xt = as_tensor(X, "X", torch.float32, ndim=2)
    same_dim(W, Xt, "W_dec", "X")
    W = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(torch.float32)
    P = Xt @ W.T  # float32 GEMM: a ranking score needs no more
    return P.mul_(P).sum(0, dtype=torch.float64)


def split_documents(doc_ids, seed: int = 0) -> torch.Tensor:
    """bool [N]: True for tokens of a random half of the documents (floor(U/2) of U), seeded."""
    from lorascope.geometry.bootstrap import document_index

    inv, u = document_index(doc_ids)
    if u < 2:
        raise LorascopeError(f"splitting needs at least 2 documents, got {u}", fix="pass more held-out documents")
    chosen = torch.randperm(u, generator=torch.Generator().manual_seed(seed))[: u // 2]
    return torch.isin(inv, chosen)


def selected_overlap(W_dec, delta, in_selection: torch.Tensor, k: int, score=None) -> float:
    """Mean cos² of principal angles between the top-k atoms of W_dec (by ``score`` on the selection half) and
    PCA_k of Δ on the other half. ``score``: [F] precomputed on the selection half, default projection energy."""
    D = as_tensor(delta, "delta", torch.float64, ndim=2)
    sel = as_tensor(in_selection, "in_selection", check_finite=False).to(torch.bool).reshape(-1)
    if sel.numel() != D.shape[0]:
        raise LorascopeError(
            f"in_selection has {sel.numel()} entries but delta has {D.shape[0]} rows",
            fix="pass one flag per token (split_documents)",
        )
    return _overlap_with(W_dec, D[sel], pca_basis(D[~sel], k), k, score)


def _overlap_with(W_dec, D_sel: torch.Tensor, basis: torch.Tensor, k: int, score=None) -> float:
    s = projection_energy(W_dec, D_sel) if score is None else score
    return subspace_summary(top_k_atoms(W_dec, s, k), basis)["mean_cos2"]


def _gaussian_rows(F: int, root: torch.Tensor, seed: int) -> torch.Tensor:
    """F unit rows (float32) with directions ~ N(0, root rootᵀ) (root [d, d])."""
    w = torch.randn(F, root.shape[0], generator=torch.Generator().manual_seed(seed)) @ root.T.to(torch.float32)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _isotropic_rows(F: int, d: int, seed: int) -> torch.Tensor:
    """:func:`_gaussian_rows` with root = I_d, bit for bit, without the [F, d] x [d, d] product."""
    w = torch.randn(F, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)


class SelectionSplit(NamedTuple):
    """What every dictionary's split-half test on one Δ shares (:func:`selection_split`): the selection half
    ``selected`` [N_s, d] (float64, and a float32 copy for the energy GEMM), the measurement half's PCA_k
    ``basis`` [k, d] and its orthonormal rows, the square root [d, d] of the covariance-matched null's Σ, k and
    the seed of the split and of the null draws."""

    selected: torch.Tensor
    selected32: torch.Tensor
    basis: torch.Tensor
    basis_q: torch.Tensor
    cov_root: torch.Tensor
    k: int
    seed: int


def selection_split(delta, doc_ids, k: int, seed: int = 0, cov=None) -> SelectionSplit:
    """Split Δ [N, d] by documents (seeded) and compute the halves' shared pieces once (see
    :func:`selection_aware_overlap`; ``cov``: Σ of the covariance-matched null, default Δ's on the selection
    half)."""
    D = as_tensor(delta, "delta", torch.float64, ndim=2)
    sel = split_documents(doc_ids, seed)
    Da, basis = D[sel], pca_basis(D[~sel], k)  # the measurement half's PCA, computed once
    S = as_tensor(cov, "cov", torch.float64, ndim=2) if cov is not None else torch.cov(Da.T)
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    root = V * lam.clamp_min(0.0).sqrt()
    return SelectionSplit(Da, Da.to(torch.float32), basis, orthonormal_rows(basis, "B"), root, k, seed)


def _selected_cos2(W: torch.Tensor, split: SelectionSplit, k: int, score=None) -> float:
    """:func:`_overlap_with` on a split: the same operations (projection energy in float32, stable top-k, principal
    angles against the measurement basis) without re-checking and re-converting the shared inputs."""
    if score is None:
        W64 = W.to(torch.float64)
        Wn = (W64 / W64.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(torch.float32)
        P = split.selected32 @ Wn.T
        score = P.mul_(P).sum(0, dtype=torch.float64)
    s = as_tensor(score, "score", torch.float64).reshape(-1)
    _check_k(k, W.shape[1], W.shape[0])
    top = W[torch.argsort(-s, stable=True)[:k]]
    theta, _, _ = _angles_and_ranks(top, split.basis, split.basis_q)
    return float((torch.cos(theta) ** 2).mean())


class SelectionAwareOverlap(NamedTuple):
    """Split-half overlap of a dictionary's selected atoms with PCA(Δ), and the same pipeline on null
    dictionaries (isotropic and covariance-matched random atoms, same F): mean and 95th percentile over draws.
    ``null`` = the larger of the two null means; ``null_q95`` = the larger 95th percentile; ``naive_null`` =
    k/d (valid only for subspaces chosen without looking at Δ; shown for contrast)."""

    value: float
    isotropic_mean: float
    isotropic_q95: float
    cov_matched_mean: float
    cov_matched_q95: float
    null: float
    null_q95: float
    naive_null: float
    n_draws: int


def selection_aware_overlap(
    W_dec, delta, doc_ids, k: int, n_draws: int = 20, seed: int = 0, score=None, cov=None
) -> SelectionAwareOverlap:
    """Selection-aware principal-angle overlap of W_dec [F, d] with Δ [N, d] (tokens of documents ``doc_ids``).

    Atoms are selected (top-k by projection energy, or by ``score`` [F] computed by the caller on the same
    selection half) on a random half of the documents and compared with PCA_k(Δ) of the other half, so the
    number is not inflated by fitting noise; then the *same* selection runs on ``n_draws`` random isotropic and
    covariance-matched (Σ = ``cov`` or Δ's covariance on the selection half) dictionaries of F atoms, because
    selecting by energy on Δ already aligns random atoms with Δ's top principal directions (the k/d null of
    random_subspace_null does not apply). Cost: (1 + 2·n_draws) projections [N/2, F]. Several dictionaries on
    the same Δ: :func:`selection_split` once, then :func:`selection_aware_overlap_on` per dictionary.
    """
    return selection_aware_overlap_on(W_dec, selection_split(delta, doc_ids, k, seed, cov), n_draws, score)


def selection_aware_overlap_on(W_dec, split: SelectionSplit, n_draws: int = 20, score=None) -> SelectionAwareOverlap:
    """:func:`selection_aware_overlap` of W_dec [F, d] on a precomputed :class:`SelectionSplit` of Δ."""
    W = as_tensor(W_dec, "W_dec", torch.float64, ndim=2)
    same_dim(W, split.selected, "W_dec", "delta")
    k, seed = split.k, split.seed
    value = _selected_cos2(W, split, k, score)
    F, d = W.shape
    iso = [_selected_cos2(_isotropic_rows(F, d, seed * 7919 + 2 * r + 1), split, k) for r in range(n_draws)]
    cm = [_selected_cos2(_gaussian_rows(F, split.cov_root, seed * 7919 + 2 * r + 2), split, k) for r in range(n_draws)]
    ti, tc = torch.tensor(iso), torch.tensor(cm)
    q = lambda t: float(torch.quantile(t, 0.95))  # noqa: E731
    return SelectionAwareOverlap(
        value,
        float(ti.mean()),
        q(ti),
        float(tc.mean()),
        q(tc),
        max(float(ti.mean()), float(tc.mean())),
        max(q(ti), q(tc)),
        random_subspace_null(k, k, d),
        n_draws,
    )


__all__ += [
    "SelectionAwareOverlap",
    "SelectionSplit",
    "projection_energy",
    "selected_overlap",
    "selection_aware_overlap",
    "selection_aware_overlap_on",
    "selection_split",
    "split_documents",
]
