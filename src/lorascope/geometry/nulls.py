"""Null dictionaries and the MMCS / overlap values they give.

Random isotropic atoms: unit Gaussian rows. For a fixed unit atom and a uniformly random unit atom in R^d the
cosine c satisfies (c + 1)/2 ~ Beta((d-1)/2, (d-1)/2), so for F_B independent random atoms:
- exact: E[max c] = ∫_{-1}^{1} (1 - F(c)^F_B) dc - 1 (numerical integral; |c| version for absolute cosines),
  and P(max c >= τ) = 1 - F(τ)^F_B (the overlap@τ null);
- asymptotic: E[max c] ≈ √(2 ln F_B / d). It *overestimates*: the expected maximum of n standard normals is
  √(2 ln n) minus a (ln ln n)/√(ln n) correction, ~13% at F_B = 4096, shrinking only slowly with F_B.
Both are independent of A (any A, random B). Covariance-matched atoms: rows ~ N(0, Σ), normalised — a stricter
null when the data (and hence trained atoms) are anisotropic.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import betainc

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor
from lorascope.geometry.cosine import mmcs


def _check_sizes(F: int, d: int) -> None:
    if F < 1 or d < 2:
        raise LorascopeError(f"need F >= 1 atoms and d >= 2 dimensions (got F={F}, d={d})", fix="pass valid sizes")


def random_isotropic_dictionary(F: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """F unit-norm rows [F, d] drawn uniformly on the sphere (normalised Gaussians)."""
    _check_sizes(F, d)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(F, d, generator=g, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).to(dtype)


def covariance_matched_dictionary(
    F: int, cov=None, data=None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """F unit-norm rows [F, d] with directions ~ N(0, Σ); Σ given as ``cov`` [d, d] or estimated from
    ``data``."""
    return _rows_from_root(F, covariance_root(cov, data), seed, dtype)


def covariance_root(cov=None, data=None) -> torch.Tensor:
    """Σ^{1/2} up to rotation [d, d] (float64, root rootᵀ = Σ) from ``cov`` [d, d] or the samples ``data``
    [N, d]: the eigendecomposition :func:`covariance_matched_dictionary` needs, to compute once for many draws."""
    if (cov is None) == (data is None):
        raise LorascopeError("pass exactly one of cov= or data=", fix="give a covariance [d, d] or samples [N, d]")
    if cov is None:
        X = as_tensor(data, "data", torch.float64, ndim=2)
        if X.shape[0] < 2:
            raise LorascopeError("need at least 2 samples to estimate a covariance", fix="pass more tokens")
        Xc = X - X.mean(0)
        cov = Xc.T @ Xc / (X.shape[0] - 1)
    S = as_tensor(cov, "cov", torch.float64, ndim=2)
    if S.shape[0] != S.shape[1]:
        raise LorascopeError(f"cov must be square, got {tuple(S.shape)}", fix="pass a [d, d] covariance")
    _check_sizes(1, S.shape[0])
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    if float(lam.min()) < -1e-8 * max(float(lam.max()), 1e-300):
        raise LorascopeError("cov is not positive semi-definite", fix="pass a covariance matrix")
    return V * lam.clamp_min(0.0).sqrt()  # Σ^{1/2} up to rotation: root rootᵀ = Σ


def _rows_from_root(F: int, root: torch.Tensor, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """F unit rows N(0, root rootᵀ) directions (float64 draws, cast to ``dtype``), seeded."""
    _check_sizes(F, root.shape[0])
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(F, root.shape[0], generator=g, dtype=torch.float64) @ root.T
    norms = w.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise LorascopeError("cov is zero", fix="pass a non-degenerate covariance")
    return (w / norms).to(dtype)


def _cos_sf(c: np.ndarray, d: int) -> np.ndarray:
    """P(cos > c) for a uniformly random unit vector against a fixed one in R^d."""
    a = (d - 1) / 2
    return betainc(a, a, np.clip((1 - c) / 2, 0.0, 1.0))


@functools.lru_cache(maxsize=256)  # the exact integral costs ~0.1-0.4 s; the study asks for few (F_B, d) pairs
def mmcs_null_isotropic(F_B: int, d: int, exact: bool = False, absolute: bool = False) -> float:
    """Expected best cosine of an atom against F_B random unit atoms in R^d.

    Default: the asymptotic √(2 ln F_B / d) (√(2 ln 2F_B / d) if ``absolute``); ``exact=True``: the
    integral over the exact cosine distribution (see module docstring).
    """
    _check_sizes(F_B, d)
    if not exact:
        return math.sqrt(2 * math.log((2 if absolute else 1) * F_B) / d) if F_B > 1 or absolute else 0.0
    lo = 0.0 if absolute else -1.0
    c = np.linspace(lo, 1.0, 200_001)
    p = np.minimum((2 if absolute else 1) * _cos_sf(c, d), 1.0)
    with np.errstate(divide="ignore"):
        cdf_max = np.exp(F_B * np.log1p(-p))  # P(max <= c) = (1 - P(c_i > c))^F_B
    return float(np.trapezoid(1.0 - cdf_max, c) + lo)


def overlap_null_isotropic(tau: float, F_B: int, d: int, absolute: bool = False) -> float:
    """P(best cosine >= tau) against F_B random unit atoms in R^d (the overlap@tau null), exact."""
    _check_sizes(F_B, d)
    p = min((2 if absolute else 1) * float(_cos_sf(np.array([tau]), d)[0]), 1.0)
    return float(-np.expm1(F_B * np.log1p(-p))) if p < 1 else 1.0


def mmcs_null_empirical(
    F_A: int, F_B: int, d: int, seed: int = 0, reps: int = 1, absolute: bool = False
) -> tuple[float, float]:
    """Mean and standard deviation over ``reps`` of MMCS(A -> B) for independent random isotropic A [F_A, d],
    B [F_B, d] (float32 GEMM)."""
    vals = []
    for r in range(reps):
        A = random_isotropic_dictionary(F_A, d, seed=2 * (seed + r) * 1000003 + 1)
        B = random_isotropic_dictionary(F_B, d, seed=2 * (seed + r) * 1000003 + 2)
        vals.append(mmcs(A, B, absolute=absolute).a_to_b)
    v = np.array(vals)
    return float(v.mean()), float(v.std(ddof=1)) if reps > 1 else float("nan")


__all__ = [
    "covariance_matched_dictionary",
    "covariance_root",
    "mmcs_null_empirical",
    "mmcs_null_isotropic",
    "overlap_null_isotropic",
    "random_isotropic_dictionary",
]


# --------------------------------------------------------------------------------------------------------------
# Alignment of an adapter dictionary with a reference dictionary: the strongest null and the ceiling
# --------------------------------------------------------------------------------------------------------------


class AlignmentNulls(NamedTuple):
    """MMCS(adapter -> reference) that chance would give, three ways (NaN where not computed):

    - ``isotropic``: exact expectation against random isotropic atoms of the reference's (alive) size;
    - ``cov_matched``: MMCS(random atoms ~ N(0, Σ_Δ), as many as the adapter's alive atoms -> reference);
    - ``sae_init``: MMCS(the adapter SAE's decoder at initialisation, alive atoms -> reference).
    ``strongest`` = the largest available; the alignment verdict must beat it."""

    isotropic: float
    cov_matched: float
    sae_init: float

    @property
    def strongest(self) -> float:
        vals = [v for v in self if not math.isnan(v)]
        return max(vals) if vals else float("nan")

    @property
    def strongest_name(self) -> str:
        best = self.strongest
        return next((name for name, v in zip(self._fields, self, strict=True) if v == best), "")


COV_MATCHED_DRAWS = 3  # covariance-matched dictionaries averaged by alignment_nulls


def _alive_count(W: torch.Tensor, alive) -> int:
    return W.shape[0] if alive is None else int(as_tensor(alive, "alive", check_finite=False).bool().sum())


def alignment_nulls(
    adapter_W,
    reference_W,
    delta_cov=None,
    init_W=None,
    alive_adapter=None,
    alive_reference=None,
    seed: int = 0,
    absolute: bool = False,
) -> AlignmentNulls:
    """Nulls for MMCS(adapter -> reference) over alive atoms (see :class:`AlignmentNulls`).

    adapter_W [F_A, d], reference_W [F_R, d]; ``delta_cov`` [d, d] covariance of Δ on *training* documents
    (omit to skip the covariance-matched null); ``init_W`` [F_A, d] the adapter SAE's decoder before training
    (omit to skip); the covariance-matched null is the mean over ``COV_MATCHED_DRAWS`` draws. Masks select alive
    atoms on both sides, as in the value being tested (Bricken et al. 2023 compare features across runs with MMCS;
    Sharkey et al. 2022 use random-dictionary baselines).
    """
    A = as_tensor(adapter_W, "adapter_W", ndim=2)
    R = as_tensor(reference_W, "reference_W", ndim=2)
    d = A.shape[1]
    iso = mmcs_null_isotropic(_alive_count(R, alive_reference), d, exact=True, absolute=absolute)
    cov = float("nan")
    if delta_cov is not None:
        n_a = _alive_count(A, alive_adapter)
        root = covariance_root(delta_cov)  # one eigendecomposition for every draw
        vals = [
            mmcs(
                _rows_from_root(n_a, root, seed * 1009 + r, torch.float32),
                R,
                absolute,
                alive_b=alive_reference,
            ).a_to_b
            for r in range(COV_MATCHED_DRAWS)
        ]
        cov = float(np.mean(vals))
    init = float("nan")
    if init_W is not None:
        init = mmcs(init_W, R, absolute, alive_a=alive_adapter, alive_b=alive_reference).a_to_b
    return AlignmentNulls(iso, cov, init)


def seed_ceiling(W_seed0, W_seed1, alive0=None, alive1=None, absolute: bool = False) -> torch.Tensor:
    """Best cosines of the alive atoms of two training seeds of the same SAE, both directions concatenated
    [F0' + F1'] (float64): their mean is the seed-vs-seed ceiling, the MMCS two runs of the *same* recipe on the
    *same* data reach. Uses the same alive atoms as the MMCS it is compared with."""
    from lorascope.geometry.cosine import best_match_both

    ab, ba = best_match_both(W_seed0, W_seed1, absolute, alive0, alive1, with_index=False)
    return torch.cat([ab.cosine, ba.cosine]).double()


__all__ += ["COV_MATCHED_DRAWS", "AlignmentNulls", "alignment_nulls", "seed_ceiling"]
