"""Decoder-atom cosines between two dictionaries: best matches, MMCS (both directions) and overlap@tau.

Rows are atoms (``W_dec`` layout [F, d]); rows are normalised before comparing. The F_A x F_B cosine matrix is
never held: rows of A are processed in chunks, each chunk costs one float32 GEMM against the normalised B, and
one pass over the chunk gives both the row maxima (A -> B) and running column maxima (B -> A). float32 is
ample for cosines (error ~1e-6). Cosines are *signed* unless ``absolute=True`` (then |cos|, so a
sign-flipped atom counts as a match).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor, same_dim

DEFAULT_CHUNK_BYTES = 256 * 2**20  # size of one [chunk, F_B] block of cosines


class BestMatch(NamedTuple):
    """Per-atom best match: ``cosine`` [F] (float32) and ``index`` [F] (int64, row of the other dictionary;
    None when computed with ``with_index=False``)."""

    cosine: torch.Tensor
    index: torch.Tensor | None


class MMCS(NamedTuple):
    """Mean max cosine similarity in both directions; ``absolute`` says whether |cos| was used."""

    a_to_b: float
    b_to_a: float
    absolute: bool

    @property
    def kind(self) -> str:
        return "absolute" if self.absolute else "signed"


def _unit(W: torch.Tensor, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-norm rows (norms accumulated in float64, no full float64 copy); zero rows raise."""
    norms = torch.linalg.vector_norm(W, dim=1, dtype=torch.float64)
    if bool((norms == 0).any()):
        bad = int((norms == 0).sum())
        raise LorascopeError(
            f"{name} has {bad} all-zero rows (atoms without a direction)",
            fix="drop zero rows or pass an alive mask that excludes them",
        )
    if dtype == torch.float64:
        return W.to(torch.float64) / norms[:, None]
    return W.to(dtype) / norms.to(dtype)[:, None]


def unit_rows(W, name: str = "W", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of ``W`` [F, d] scaled to unit norm (norms computed in float64); zero rows raise."""
    return _unit(as_tensor(W, name, ndim=2), name, dtype)


def _column_argmax(S: torch.Tensor, colmax: torch.Tensor) -> torch.Tensor:
    """First row index attaining ``colmax`` in each column of S [c, F]. torch's max(dim=0) with indices is
    ~10x slower than amax on this layout; locating the maxima by equality is ~2x cheaper than that."""
    rows, cols = (S == colmax).nonzero(as_tuple=True)
    out = torch.full((S.shape[1],), S.shape[0], dtype=torch.int64, device=S.device)
    return out.scatter_reduce_(0, cols, rows, reduce="amin")


def _select(W: torch.Tensor, alive, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of W kept by the boolean mask ``alive`` [F] and their original indices."""
    if alive is None:
        return W, torch.arange(W.shape[0], device=W.device)
    mask = as_tensor(alive, f"alive mask of {name}", check_finite=False).to(torch.bool).reshape(-1)
    if mask.shape[0] != W.shape[0]:
        raise LorascopeError(
            f"alive mask of {name} has {mask.shape[0]} entries but {name} has {W.shape[0]} rows",
            fix="pass one boolean per atom",
        )
    idx = torch.nonzero(mask.to(W.device)).reshape(-1)
    if idx.numel() == 0:
        raise LorascopeError(f"alive mask of {name} keeps no atoms", fix="check the density threshold")
    return W[idx], idx


def _chunk_rows(n_cols: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * max(n_cols, 1)))


def best_match_both(
    A,
    B,
    absolute: bool = False,
    alive_a=None,
    alive_b=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    with_index: bool = True,
) -> tuple[BestMatch, BestMatch]:
    """Best match of every atom of A in B and of every atom of B in A, in one chunked pass.

    A [F_A, d], B [F_B, d]. Returns (A->B, B->A); with alive masks, only alive atoms are compared and the
    results cover the alive atoms (indices refer to the original rows). ``with_index=False`` skips the argmax
    bookkeeping (``index`` is then None; MMCS and overlap need only the values). Memory: a normalised float32
    copy of B plus one [chunk, F_B] float32 block.
    """
    A = as_tensor(A, "A", ndim=2)
    B = as_tensor(B, "B", ndim=2)
    same_dim(A, B, "A", "B")
    A, idx_a = _select(A, alive_a, "A")
    B, idx_b = _select(B, alive_b, "B")
    BnT = _unit(B, "B").T  # one normalised copy of B; A is normalised chunk by chunk
    fa, fb = A.shape[0], B.shape[0]
    dev = BnT.device
    best_a = torch.empty(fa, dtype=torch.float32, device=dev)
    arg_a = torch.zeros(fa, dtype=torch.int64, device=dev)
    best_b = torch.full((fb,), -float("inf"), dtype=torch.float32, device=dev)
    arg_b = torch.zeros(fb, dtype=torch.int64, device=dev)
    step = _chunk_rows(fb, chunk_bytes)
    for start in range(0, fa, step):
        S = _unit(A[start : start + step].to(dev), "A") @ BnT  # [c, F_B] float32 cosines
        if absolute:
            S.abs_()
        if with_index:
            best_a[start : start + step], arg_a[start : start + step] = S.max(dim=1)
        else:
            best_a[start : start + step] = S.amax(dim=1)
        v = S.amax(dim=0)
        better = v > best_b
        best_b = torch.where(better, v, best_b)
        if with_index:
            arg_b = torch.where(better, _column_argmax(S, v) + start, arg_b)
        del S
    if not with_index:
        return BestMatch(best_a, None), BestMatch(best_b, None)
    return BestMatch(best_a, idx_b[arg_a]), BestMatch(best_b, idx_a[arg_b])


def best_match_cosines(
    A, B, absolute: bool = False, alive_a=None, alive_b=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> BestMatch:
    """For each atom of A [F_A, d]: the largest cosine to any atom of B [F_B, d] and that atom's index."""
    return best_match_both(A, B, absolute, alive_a, alive_b, chunk_bytes)[0]


def mmcs(A, B, absolute: bool = False, alive_a=None, alive_b=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> MMCS:
    """Mean max cosine similarity A->B (mean over A of the best cosine in B) and B->A, signed unless
    ``absolute``."""
    ab, ba = best_match_both(A, B, absolute, alive_a, alive_b, chunk_bytes, with_index=False)
    return MMCS(float(ab.cosine.double().mean()), float(ba.cosine.double().mean()), absolute)


def overlap(
    A,
    B,
    tau: float,
    absolute: bool = False,
    alive_a=None,
    alive_b=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> float:
    """Fraction of A's atoms whose best cosine in B is >= ``tau`` (overlap@tau, A -> B)."""
    if not -1.0 <= tau <= 1.0:
        raise LorascopeError(f"tau = {tau} is not a cosine", fix="choose tau in [-1, 1], e.g. 0.7")
    best = best_match_both(A, B, absolute, alive_a, alive_b, chunk_bytes, with_index=False)[0].cosine
    return float((best >= tau).double().mean())


__all__ = ["BestMatch", "MMCS", "best_match_both", "best_match_cosines", "mmcs", "overlap", "unit_rows"]
