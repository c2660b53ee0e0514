"""One-to-one matching of two dictionaries' atoms (Hungarian algorithm on 1 - cos over alive atoms).

Dense mode (default up to ``max_dense`` atoms per side) builds the alive F_A x F_B cost matrix in float64 —
scipy's ``linear_sum_assignment`` needs it dense — and is exact. Its memory is 8·F_A·F_B bytes (2 GiB at
16384²) and its time is cubic in the worst case, so larger problems are refused unless ``candidates`` is
given.

Sparse mode (``candidates=m``): keep only each atom's top-m cosines in both directions (found chunk-wise,
never holding the dense matrix) and solve a minimum-weight full bipartite matching on that graph
(``scipy.sparse.csgraph.min_weight_full_bipartite_matching``). It is exact *whenever the optimal dense
matching only uses candidate pairs* — true for dictionaries that really share atoms, not guaranteed in
general — and it fails (LorascopeError) if the candidate graph has no matching covering the smaller side;
then raise m.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor, same_dim
from lorascope.geometry.cosine import DEFAULT_CHUNK_BYTES, _chunk_rows, _select, unit_rows

MAX_DENSE_ATOMS = 8192


def _top_candidates(An: torch.Tensor, Bn: torch.Tensor, m: int, absolute: bool, chunk_bytes: int):
    """Union of each A atom's top-m and each B atom's top-m (signed or absolute) cosines as COO triplets."""
    fa, fb = An.shape[0], Bn.shape[0]
    ma, mb = min(m, fb), min(m, fa)
    rows, cols = [], []
    top_b_val = torch.empty(0, fb, dtype=torch.float32)
    top_b_idx = torch.empty(0, fb, dtype=torch.int64)
    step = _chunk_rows(fb, chunk_bytes)
    BT = Bn.float().T  # float32 GEMM to find candidates; their cosines are recomputed in float64 below
    for start in range(0, fa, step):
        S = An[start : start + step].float() @ BT
        score = S.abs() if absolute else S
        _, j = score.topk(ma, dim=1)
        rows.append((torch.arange(S.shape[0])[:, None] + start).expand(-1, ma).reshape(-1))
        cols.append(j.reshape(-1))
        v, i = score.topk(min(mb, S.shape[0]), dim=0)
        vals = torch.cat([top_b_val, v.cpu()])
        idxs = torch.cat([top_b_idx, i.cpu() + start])
        keep_v, keep_i = vals.topk(min(mb, vals.shape[0]), dim=0)
        top_b_val, top_b_idx = keep_v, idxs.gather(0, keep_i)
    rows.append(top_b_idx.reshape(-1))
    cols.append(torch.arange(fb).expand(top_b_idx.shape[0], -1).reshape(-1))
    r = torch.cat([x.cpu() for x in rows]).numpy()
    c = torch.cat([x.cpu() for x in cols]).numpy()
    pairs = np.unique(r.astype(np.int64) * fb + c, return_index=False)
    r, c = pairs // fb, pairs % fb
    cos = (An[torch.from_numpy(r)].double() * Bn[torch.from_numpy(c)].double()).sum(1).numpy()
    return r, c, cos


def hungarian_match(
    A,
    B,
    alive_a=None,
    alive_b=None,
    absolute: bool = False,
    max_dense: int = MAX_DENSE_ATOMS,
    candidates: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> pd.DataFrame:
    """Optimal one-to-one matching of alive atoms of A [F_A, d] and B [F_B, d] minimising sum(1 - cos).

    Returns a DataFrame with one row per matched pair (min(#alive A, #alive B) rows, sorted by ``a``):
    ``a``, ``b`` (original row indices), ``cosine`` (signed cosine of the pair, float64). With
    ``absolute=True`` the cost is 1 - |cos| (sign flips match) and ``cosine`` keeps the sign. Dense if both
    alive sides <= ``max_dense``, otherwise ``candidates`` (top-m per atom, see module docstring) is required.
    """
    A = as_tensor(A, "A", ndim=2)
    B = as_tensor(B, "B", ndim=2)
    same_dim(A, B, "A", "B")
    A, idx_a = _select(A, alive_a, "A")
    B, idx_b = _select(B, alive_b, "B")
    An, Bn = unit_rows(A, "A", torch.float64).cpu(), unit_rows(B, "B", torch.float64).cpu()
    fa, fb = An.shape[0], Bn.shape[0]
    if candidates is None:
        if max(fa, fb) > max_dense:
            raise LorascopeError(
                f"dense Hungarian matching of {fa} x {fb} atoms needs a {fa * fb * 8 / 2**30:.1f} GiB "
                f"float64 cost matrix and cubic time (cap: {max_dense} atoms per side)",
                fix="pass candidates=32 for the sparse top-candidate matching, or restrict to alive atoms",
            )
        r, c, pair_cos = _dense_assignment(An, Bn, absolute)
    else:
        r, c, pair_cos = _sparse_assignment(An, Bn, absolute, candidates, chunk_bytes)
    order = np.argsort(r, kind="stable")
    return pd.DataFrame(
        {"a": idx_a.cpu().numpy()[r[order]], "b": idx_b.cpu().numpy()[c[order]], "cosine": pair_cos[order]}
    )


def _dense_assignment(An: torch.Tensor, Bn: torch.Tensor, absolute: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact assignment on the full 1 - cos (or 1 - |cos|) cost of unit rows: rows, columns, signed pair cosines."""
    from scipy.optimize import linear_sum_assignment

    cos = (An @ Bn.T).numpy()
    score = np.abs(cos) if absolute else cos
    r, c = linear_sum_assignment(1.0 - score)
    return r, c, cos[r, c]


def _sparse_assignment(
    An: torch.Tensor, Bn: torch.Tensor, absolute: bool, candidates: int, chunk_bytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full matching restricted to each atom's top-``candidates`` partners: rows, columns, signed pair cosines."""
    if candidates < 1:
        raise LorascopeError(f"candidates = {candidates} must be >= 1", fix="use e.g. candidates=32")
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    fa, fb = An.shape[0], Bn.shape[0]
    r0, c0, cos0 = _top_candidates(An, Bn, candidates, absolute, chunk_bytes)
    score = np.abs(cos0) if absolute else cos0
    # cost 2 - score lies in [1, 3]: strictly positive so every candidate edge is stored; the constant
    # shift does not change which full matching is optimal (all have min(fa, fb) edges).
    graph = coo_matrix((2.0 - score, (r0, c0)), shape=(fa, fb)).tocsr()
    try:
        r, c = min_weight_full_bipartite_matching(graph)
    except ValueError as err:
        raise LorascopeError(
            f"the top-{candidates} candidate graph has no matching covering all atoms",
            fix="raise candidates (or use dense matching on fewer atoms)",
        ) from err
    lookup = dict(zip((r0 * fb + c0).tolist(), cos0.tolist(), strict=True))
    pair_cos = np.array([lookup[int(i) * fb + int(j)] for i, j in zip(r, c, strict=True)], dtype=np.float64)
    return r, c, pair_cos


def matched_cosine_mean(pairs: pd.DataFrame, absolute: bool = False) -> float:
    """Mean cosine over matched pairs (|cos| if ``absolute``)."""
    v = pairs["cosine"].to_numpy()
    return float(np.mean(np.abs(v) if absolute else v)) if len(v) else float("nan")


__all__ = ["MAX_DENSE_ATOMS", "hungarian_match", "matched_cosine_mean"]
