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

``StreamingLinearCKA`` accumulates XᵀX, YᵀY, XᵀY and column sums in float64 over batches (O(d²) memory) and,
for the debiased estimate, the few extra moments that Σ_t a_t b_t needs after centring — so both the biased
and the debiased numbers are exact (equal to the in-memory ones up to float64 rounding). Batches are shifted
by the first batch's mean before accumulating: CKA is shift-invariant and this avoids cancellation when the
data sit far from the origin.
"""

from __future__ import annotations

import math

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
    n = X.shape[0]
    xy = float(((Y.T @ X) ** 2).sum())
    xx = float(((X.T @ X) ** 2).sum())
    yy = float(((Y.T @ Y) ** 2).sum())
    if not debiased:
        return xy, xx, yy
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
        return _ratio(
            _debias(xy, s_ab, sa, sb, n), _debias(xx, s_aa, sa, sa, n), _debias(yy, s_bb, sb, sb, n)
        )


__all__ = [
    "StreamingLinearCKA",
    "center_gram",
    "cka_from_grams",
    "gram_linear",
    "gram_rbf",
    "linear_cka",
    "rbf_cka",
]
