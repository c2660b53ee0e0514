"""Centred kernel alignment (Kornblith et al. 2019): linear and RBF, biased and debiased, in-memory and
streaming.

CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for Gram matrices K, L [N, N] of the same N tokens.
- Biased HSIC: tr(H K H L) with H = I - 11ᵀ/N. For the linear kernel it equals ‖Yᵀ X‖²_F on column-centred
  X, Y (feature-space form, O(N d²) instead of O(N² d)).
- Debiased HSIC (Song et al. 2007, the unbiased U-statistic): U-centre K (diagonal zeroed, row/column means
  over N-2, grand mean over 2(N-1)), take <K~, L~>_F. Needs N >= 4. The factor 1/(N(N-3)) cancels in CKA.
  Linear feature-space form (centred X, Y; a_t = ‖x_t‖², b_t = ‖y_t‖²):
  N(N-3)·HSIC_u = ‖YᵀX‖²_F - N/(N-2)·Σ_t a_t b_t + ‖X‖²_F ‖Y‖²_F / ((N-1)(N-2)).
- RBF kernel: exp(-‖x_i - x_j‖² / (2σ²)), σ = bandwidth · median pairwise distance, the median taken over
  all N² squared distances (diagonal included), as in the Kornblith reference notebook.

Derivation of the debiased feature-space form: with K = XXᵀ, L = YYᵀ (X, Y centred, so 1ᵀK = 1ᵀL = 0), the
unbiased estimator of Song et al. (2007, Thm. 2) is
  N(N-3)·HSIC_u = tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((N-1)(N-2)) - 2/(N-2)·1ᵀK̃L̃1,  K̃, L̃ = K, L with zero diagonal.
K̃ = K - diag(a), 1ᵀK̃ = -aᵀ, so tr(K̃L̃) = ‖YᵀX‖²_F - Σ a_t b_t, 1ᵀK̃1 = -Σa, 1ᵀK̃L̃1 = aᵀb; collecting terms
gives the form above (checked against the N x N U-centred Gram in tests/geometry/test_cka.py).

Permutation null (:func:`cka_permutation_null`): CKA of unrelated representations is not 0 for the biased
estimator and fluctuates about 0 for the debiased one; whether an observed value exceeds chance is judged by
re-pairing the *documents* of Y with other documents of X (tokens within a document stay together and in order,
so within-document correlation and position effects are kept, as a block permutation test should). The test
runs on documents cut to one length m, so the observed pairing is exchangeable with every permuted one (exact
under "documents of X and Y unrelated").

``StreamingLinearCKA`` accumulates XᵀX, YᵀY, XᵀY and column sums in float64 over batches (O(d²) memory) and,
for the debiased estimate, the few extra moments that Σ_t a_t b_t needs after centring — so both the biased
and the debiased numbers are exact (equal to the in-memory ones up to float64 rounding). Batches are shifted
by the first batch's mean before accumulating: CKA is shift-invariant and this avoids cancellation when the
data sit far from the origin.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor


def _pair(X, Y, dtype: torch.dtype | None = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    X = as_tensor(X, "X", dtype, ndim=2)
    Y = as_tensor(Y, "Y", dtype, ndim=2)
    if X.shape[0] != Y.shape[0]:
        raise LorascopeError(
            f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; CKA compares the same tokens",
            fix="pass activations of the same tokens in the same order",
        )
    return X, Y


def _check_n(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise LorascopeError(f"debiased CKA needs at least 4 samples, got {n}", fix="pass N >= 4 tokens")
    if n < 2:
        raise LorascopeError(f"CKA needs at least 2 samples, got {n}", fix="pass N >= 2 tokens")


def _ratio(xy: float, xx: float, yy: float) -> float:
    if xx <= 0 or yy <= 0:
        raise LorascopeError(
            "CKA is undefined: one representation has zero (estimated) variance",
            fix="check that X and Y are not constant across tokens",
        )
    return xy / math.sqrt(xx * yy)


def center_gram(K: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Double-centred Gram (H K H), or the U-centred Gram (diagonal zeroed) when ``debiased``."""
    K = K.clone()
    n = K.shape[0]
    if not debiased:
        K -= K.mean(0, keepdim=True)
        K -= K.mean(1, keepdim=True)
        return K
    K.fill_diagonal_(0.0)
    col = K.sum(0) / (n - 2)
    col -= col.sum() / (2 * (n - 1))
    K -= col[None, :]
    K -= col[:, None]
    K.fill_diagonal_(0.0)
    return K


def cka_from_grams(K, L, debiased: bool = False) -> float:
    """CKA of two Gram matrices K, L [N, N] (any kernel)."""
    K = as_tensor(K, "K", torch.float64, ndim=2)
    L = as_tensor(L, "L", torch.float64, ndim=2)
    if K.shape != L.shape or K.shape[0] != K.shape[1]:
        raise LorascopeError(
            f"Gram matrices must be square and equal-sized, got {tuple(K.shape)}, {tuple(L.shape)}",
            fix="build both Grams from the same N tokens",
        )
    _check_n(K.shape[0], debiased)
    Kc, Lc = center_gram(K, debiased), center_gram(L, debiased)
    return _ratio(float((Kc * Lc).sum()), float((Kc * Kc).sum()), float((Lc * Lc).sum()))


def gram_linear(X) -> torch.Tensor:
    """X Xᵀ [N, N] in float64."""
    X = as_tensor(X, "X", torch.float64, ndim=2)
    return X @ X.T


def gram_rbf(X, bandwidth: float = 0.5) -> torch.Tensor:
    """RBF Gram [N, N]: exp(-D² / (2 σ²)), σ = bandwidth · median distance (median over all N² entries)."""
    if bandwidth <= 0:
        raise LorascopeError(f"bandwidth = {bandwidth} must be > 0", fix="use a fraction such as 0.5")
    X = as_tensor(X, "X", torch.float64, ndim=2)
    G = X @ X.T
    sq = G.diagonal()
    D2 = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0.0)
    D2.fill_diagonal_(0.0)
    med = float(np.median(D2.cpu().numpy()))  # as np.median in the reference notebook (mean of middle two)
    if med <= 0:
        raise LorascopeError(
            "median pairwise distance is 0 (more than half the tokens coincide)",
            fix="deduplicate tokens or use linear CKA",
        )
    return torch.exp(-D2 / (2 * bandwidth**2 * med))


def _linear_hsic_feature(X: torch.Tensor, Y: torch.Tensor, debiased: bool) -> tuple[float, float, float]:
    """(HSIC_xy, HSIC_xx, HSIC_yy) up to a common factor, in feature space; X, Y already centred."""
    raw = _cross_terms(X, Y)
    return _debiased_terms(X, Y, raw) if debiased else raw


def _cross_terms(X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float, float]:
    """‖YᵀX‖²_F, ‖XᵀX‖²_F, ‖YᵀY‖²_F of centred X, Y: the biased HSIC terms."""
    return float(((Y.T @ X) ** 2).sum()), float(((X.T @ X) ** 2).sum()), float(((Y.T @ Y) ** 2).sum())


def _debiased_terms(X: torch.Tensor, Y: torch.Tensor, raw: tuple[float, float, float]) -> tuple[float, float, float]:
    """The debiased HSIC terms from the biased ones ``raw`` (:func:`_cross_terms`) and the row norms."""
    n = X.shape[0]
    xy, xx, yy = raw
    a, b = (X * X).sum(1), (Y * Y).sum(1)
    sa, sb = float(a.sum()), float(b.sum())
    return (
        _debias(xy, float((a * b).sum()), sa, sb, n),
        _debias(xx, float((a * a).sum()), sa, sa, n),
        _debias(yy, float((b * b).sum()), sb, sb, n),
    )


def _debias(cross: float, sum_ab: float, sa: float, sb: float, n: int) -> float:
    return cross - n / (n - 2) * sum_ab + sa * sb / ((n - 1) * (n - 2))


def linear_cka(X, Y, debiased: bool = False) -> float:
    """Linear CKA between X [N, d1] and Y [N, d2] (feature-space form, float64)."""
    X, Y = _pair(X, Y)
    _check_n(X.shape[0], debiased)
    return _ratio(*_linear_hsic_feature(X - X.mean(0), Y - Y.mean(0), debiased))


def linear_cka_both(X, Y) -> tuple[float, float]:
    """(debiased, biased) linear CKA of X [N, d1] and Y [N, d2], each equal bit for bit to :func:`linear_cka`,
    from one set of the [d, d] cross products (the expensive part) instead of two."""
    X, Y = _pair(X, Y)
    _check_n(X.shape[0], True)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    raw = _cross_terms(X, Y)
    return _ratio(*_debiased_terms(X, Y, raw)), _ratio(*raw)


def rbf_cka(X, Y, bandwidth: float = 0.5, debiased: bool = False) -> float:
    """RBF-kernel CKA between X [N, d1] and Y [N, d2] via N x N Grams (small N only: O(N²) memory)."""
    X, Y = _pair(X, Y)
    _check_n(X.shape[0], debiased)
    return cka_from_grams(gram_rbf(X, bandwidth), gram_rbf(Y, bandwidth), debiased)


class StreamingLinearCKA:
    """Linear CKA over many batches in O(d1² + d2² + d1·d2) float64 memory.

    ``update(x [n, d1], y [n, d2])`` per batch; ``value(debiased=False)`` at any time. Matches
    :func:`linear_cka` on the concatenated data to float64 rounding (~1e-12), biased and debiased.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift_x: torch.Tensor | None = None
        self._shift_y: torch.Tensor | None = None

    def update(self, x, y) -> None:
        """Add a batch: x [n, d1], y [n, d2] (any float dtype; accumulated in float64)."""
        x, y = _pair(x, y, dtype=None)  # finiteness checked in the input dtype, then one float64 copy each
        x = x.to(torch.float64, copy=True)
        y = y.to(torch.float64, copy=True)
        if self._shift_x is None:
            self._shift_x, self._shift_y = x.mean(0), y.mean(0)
            d1, d2 = x.shape[1], y.shape[1]
            z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)  # noqa: E731
            self.xx, self.yy, self.xy = z(d1, d1), z(d2, d2), z(d1, d2)
            self.sx, self.sy = z(d1), z(d2)
            # moments of the row norms a_t = ‖x_t‖², b_t = ‖y_t‖² (for the debiased estimate)
            self.ax, self.ay, self.bx, self.by = z(d1), z(d2), z(d1), z(d2)
            self.saa = self.sbb = self.sab = 0.0
        elif x.shape[1] != self.xx.shape[0] or y.shape[1] != self.yy.shape[0]:
            raise LorascopeError(
                f"batch widths {x.shape[1]}, {y.shape[1]} differ from the first batch's "
                f"{self.xx.shape[0]}, {self.yy.shape[0]}",
                fix="stream one layer pair at a time",
            )
        x -= self._shift_x
        y -= self._shift_y
        a = torch.linalg.vector_norm(x, dim=1).square_()
        b = torch.linalg.vector_norm(y, dim=1).square_()
        self.n += x.shape[0]
        self.xx.addmm_(x.T, x)  # in place: no [d, d] temporaries
        self.yy.addmm_(y.T, y)
        self.xy.addmm_(x.T, y)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.ax.addmv_(x.T, a)
        self.ay.addmv_(y.T, a)
        self.bx.addmv_(x.T, b)
        self.by.addmv_(y.T, b)
        self.saa += float(a @ a)
        self.sbb += float(b @ b)
        self.sab += float(a @ b)

    def _centred_norm_product(
        self,
        s_ab: float,
        u: torch.Tensor,
        w: torch.Tensor,
        M: torch.Tensor,
        mx: torch.Tensor,
        my: torch.Tensor,
        sa: float,
        sb: float,
    ) -> float:
        """Σ_t ‖x_t - μx‖² ‖y_t - μy‖² from raw moments: s_ab = Σ a b, u = Σ a y, w = Σ b x, M = Σ x yᵀ."""
        cx, cy = float(mx @ mx), float(my @ my)
        return (
            s_ab
            - 2 * float(u @ my)
            - 2 * float(w @ mx)
            + 4 * float(mx @ M @ my)
            + cy * sa
            + cx * sb
            - 3 * self.n * cx * cy
        )

    def value(self, debiased: bool = False) -> float:
        """Linear CKA of everything seen so far."""
        _check_n(self.n, debiased)
        n = self.n
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx - n * torch.outer(mx, mx)
        cyy = self.yy - n * torch.outer(my, my)
        cxy = self.xy - n * torch.outer(mx, my)
        xy, xx, yy = float((cxy**2).sum()), float((cxx**2).sum()), float((cyy**2).sum())
        if not debiased:
            return _ratio(xy, xx, yy)
        sa, sb = float(cxx.trace()), float(cyy.trace())  # centred ‖X‖²_F, ‖Y‖²_F
        raw_a, raw_b = float(self.xx.trace()), float(self.yy.trace())
        s_ab = self._centred_norm_product(self.sab, self.ay, self.bx, self.xy, mx, my, raw_a, raw_b)
        s_aa = self._centred_norm_product(self.saa, self.ax, self.ax, self.xx, mx, mx, raw_a, raw_a)
        s_bb = self._centred_norm_product(self.sbb, self.by, self.by, self.yy, my, my, raw_b, raw_b)
        return _ratio(_debias(xy, s_ab, sa, sb, n), _debias(xx, s_aa, sa, sa, n), _debias(yy, s_bb, sb, sb, n))


class CKANull(NamedTuple):
    """CKA on all rows (``value``), and the document-permutation test on the balanced design: ``tested_value``
    (observed pairing), null mean and 95th percentile, one-sided p-value, and the design's size."""

    value: float
    tested_value: float
    null_mean: float
    null_q95: float
    p_value: float
    n_perm: int
    n_docs: int
    doc_length: int
    debiased: bool


def _doc_rows(doc_ids) -> list[torch.Tensor]:
    """Row indices of each document, in row order (documents ordered by id)."""
    from lorascope.geometry.bootstrap import document_index

    inv, u = document_index(doc_ids)
    order = torch.argsort(inv, stable=True)
    return list(torch.split(order, torch.bincount(inv, minlength=u).tolist()))


def balanced_design(docs: list[torch.Tensor], doc_length: int | None = None) -> tuple[torch.Tensor, int]:
    """[U', m] row indices: the first m tokens of every document with at least m tokens.

    m defaults to the lower quartile of the document lengths (keeps >= 75% of the documents). Equal lengths make
    every re-pairing of documents an exact relabelling, so the permutation test is exact (exchangeable).
    """
    lengths = torch.tensor([d.numel() for d in docs])
    m = int(torch.quantile(lengths.double(), 0.25, interpolation="lower")) if doc_length is None else doc_length
    if m < 1:
        raise LorascopeError(f"doc_length = {m} must be >= 1", fix="pass a positive doc_length")
    kept = [d[:m] for d in docs if d.numel() >= m]
    return (torch.stack(kept) if kept else torch.empty(0, m, dtype=torch.int64)), m


def _blocks(G: torch.Tensor, u: int, m: int) -> torch.Tensor:
    """G [u·m, u·m] as its u² blocks [u·u, m, m], each contiguous (block (a, b) at a·u + b)."""
    return G.view(u, m, u, m).permute(0, 2, 1, 3).reshape(u * u, m, m)


def _permuted_inner(Kb: torch.Tensor, Lb: torch.Tensor, perm: torch.Tensor, buf: torch.Tensor) -> float:
    """Σ_ab <K̃ block (a, b), L̃ block (π(a), π(b))> = <K̃, L̃ with its documents re-paired by ``perm``>, for
    Grams in block layout (:func:`_blocks`): one gather of contiguous blocks into ``buf`` (reused: a fresh
    N'² allocation costs more than the gather) and one dot product."""
    u = perm.numel()
    idx = (perm[:, None] * u + perm[None, :]).reshape(-1)
    return float(torch.dot(Kb.reshape(-1), torch.index_select(Lb, 0, idx, out=buf).reshape(-1)))


def cka_permutation_null(
    X,
    Y,
    doc_ids,
    n_perm: int = 200,
    seed: int = 0,
    debiased: bool = True,
    doc_length: int | None = None,
    value: float | None = None,
) -> CKANull:
    """Linear CKA of X [N, d1] vs Y [N, d2] with a null from re-pairing whole documents.

    The test runs on a balanced design (:func:`balanced_design`: the first m tokens of each document with >= m
    tokens). Each permutation π pairs the m tokens of document i of X with the m tokens of document π(i) of Y,
    in order, and recomputes CKA from the cached Grams. Both sides keep "which tokens share a document", so two
    representations that each merely encode document identity are not called similar.
    p = (1 + #{null >= observed}) / (1 + n_perm) (Phipson & Smyth 2010). Cost: two N' x N' Grams, O(N'²) per
    permutation (N' = U'·m rows). ``value`` is the CKA on all rows, for the table (pass it when already
    computed, e.g. by :func:`linear_cka_both`).

    Centring commutes with re-pairing (it is permutation-equivariant), so each permutation reads the centred
    Gram L̃ re-indexed: <K̃, L̃_π> with ‖L̃_π‖ = ‖L̃‖: one gather of whole m x m blocks and one dot product
    instead of re-centring L per permutation (equal to that up to the order of float64 sums).
    """
    X, Y = _pair(X, Y)
    _check_n(X.shape[0], debiased)
    docs = _doc_rows(doc_ids)
    if sum(d.numel() for d in docs) != X.shape[0]:
        raise LorascopeError(
            f"doc_ids has {sum(d.numel() for d in docs)} entries but X has {X.shape[0]} rows",
            fix="pass one document id per row (e.g. the store's doc_index)",
        )
    design, m = balanced_design(docs, doc_length)
    if design.shape[0] < 3 or n_perm < 1 or design.numel() < 4:
        raise LorascopeError(
            f"a document permutation null needs >= 3 documents of >= {m} tokens and n_perm >= 1 "
            f"(got {design.shape[0]} documents, n_perm={n_perm})",
            fix="pass more held-out documents or a smaller doc_length",
        )
    value = linear_cka(X, Y, debiased) if value is None else value
    Xb, Yb = X[design.reshape(-1)], Y[design.reshape(-1)]
    Kc = center_gram(gram_linear(Xb - Xb.mean(0)), debiased)
    Lc = center_gram(gram_linear(Yb - Yb.mean(0)), debiased)
    kk, ll = float((Kc * Kc).sum()), float((Lc * Lc).sum())
    u = design.shape[0]
    Kb, Lb = _blocks(Kc, u, m), _blocks(Lc, u, m)
    del Kc, Lc
    buf = torch.empty_like(Lb)
    observed = _ratio(_permuted_inner(Kb, Lb, torch.arange(u), buf), kk, ll)  # the same sum as every null value
    gen = torch.Generator().manual_seed(seed)
    null = [_ratio(_permuted_inner(Kb, Lb, torch.randperm(u, generator=gen), buf), kk, ll) for _ in range(n_perm)]
    v = torch.tensor(null, dtype=torch.float64)
    p = (1 + int((v >= observed).sum())) / (1 + n_perm)
    return CKANull(
        value, observed, float(v.mean()), float(torch.quantile(v, 0.95)), p, n_perm, design.shape[0], m, debiased
    )


__all__ = [
    "CKANull",
    "StreamingLinearCKA",
    "cka_permutation_null",
    "balanced_design",
    "center_gram",
    "cka_from_grams",
    "gram_linear",
    "gram_rbf",
    "linear_cka",
    "linear_cka_both",
    "rbf_cka",
]
