"""Dictionary comparison as tidy rows: MMCS both ways with nulls and intervals, overlap@tau, matched
cosine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorascope import results_schema as schema
from lorascope.geometry._array import as_tensor, same_dim
from lorascope.geometry.bootstrap import bootstrap_ci
from lorascope.geometry.cosine import best_match_both
from lorascope.geometry.matching import MAX_DENSE_ATOMS, hungarian_match, matched_cosine_mean
from lorascope.geometry.nulls import mmcs_null_isotropic, overlap_null_isotropic
from lorascope.results import ResultRow

FAMILY = "decoder_similarity"


@dataclass(frozen=True)
class CompareOptions:
    """Settings of :func:`compare_dictionaries`: ``seed`` of the bootstrap, overlap thresholds ``taus``,
    ``absolute`` (|cos|, sign-invariant) or signed cosines, ``n_boot`` bootstrap resamples (0: no interval) and
    ``match`` (None: Hungarian matching only when both sides are small enough for the dense solver; True: always,
    sparse when large; False: never)."""

    seed: int = 0
    taus: tuple[float, ...] = (0.5, 0.7, 0.9)
    absolute: bool = False
    n_boot: int = 1000
    match: bool | None = None


def compare_dictionaries(
    A,
    B,
    name_a: str,
    name_b: str,
    options: CompareOptions | None = None,
    *,
    alive_a=None,
    alive_b=None,
    **where: Any,
) -> list[ResultRow]:
    """Rows for A [F_A, d] vs B [F_B, d] (decoder rows as atoms), over the alive atoms ``alive_a``/``alive_b``
    (bool masks; None: all), with the settings of ``options`` (:class:`CompareOptions`; None: its defaults).

    - ``mmcs_{a}_to_{b}`` and ``mmcs_{b}_to_{a}``: mean best cosine, percentile bootstrap CI over atoms
      (seeded), null = exact expected MMCS against random isotropic atoms of the target's size
      ("random_isotropic").
    - ``overlap_{a}_to_{b}@{tau}`` (and reverse): fraction of atoms with best cosine >= tau; null = exact
      P(best >= tau) for random isotropic atoms.
    - ``hungarian_mean_cos``: mean cosine over the Hungarian matching of alive atoms (only when both
      sides have <= MAX_DENSE_ATOMS alive atoms unless ``match=True``, which then uses the top-32-candidate
      sparse matching).
    ``note`` records signed/absolute cosines. ``where``: layer=, adapter=, rank=.
    """
    opt = options or CompareOptions()
    seed, taus, absolute, n_boot, match = opt.seed, opt.taus, opt.absolute, opt.n_boot, opt.match
    A = as_tensor(A, "A", ndim=2)
    B = as_tensor(B, "B", ndim=2)
    same_dim(A, B, "A", "B")
    d = A.shape[1]
    ab, ba = best_match_both(A, B, absolute, alive_a, alive_b, with_index=False)
    kind = "absolute" if absolute else "signed"
    dtype = str(A.dtype).replace("torch.", "")
    rows: list[ResultRow] = []
    for src, dst, best, other in ((name_a, name_b, ab, ba), (name_b, name_a, ba, ab)):
        cos = best.cosine.double().cpu()
        common = dict(family=FAMILY, n=cos.numel(), d=d, dtype=dtype, note=f"{kind} cosines", **where)
        ci = bootstrap_ci(cos, n_boot=n_boot, seed=seed) if n_boot > 0 and cos.numel() > 1 else None
        rows += _direction_rows(src, dst, cos, other.cosine.numel(), ci, taus, absolute, common)
    n_a, n_b = ab.cosine.numel(), ba.cosine.numel()
    dense_ok = max(n_a, n_b) <= MAX_DENSE_ATOMS
    if match or (match is None and dense_ok):
        pairs = hungarian_match(A, B, alive_a, alive_b, absolute, candidates=None if dense_ok else 32)
        rows.append(
            ResultRow(
                metric=schema.HUNGARIAN_MEAN_COS,
                family=FAMILY,
                value=matched_cosine_mean(pairs, absolute),
                n=len(pairs),
                d=d,
                dtype=dtype,
                note=f"{kind} cosines, Hungarian on 1 - cos, alive atoms",
                **where,
            )
        )
    return rows


def _direction_rows(
    src: str,
    dst: str,
    cos: torch.Tensor,
    f_dst: int,
    ci,
    taus: tuple[float, ...],
    absolute: bool,
    common: dict[str, Any],
) -> list[ResultRow]:
    """MMCS row (with ``ci`` if any) and one overlap row per tau for best cosines ``cos`` of ``src`` atoms in ``dst``
    (``f_dst`` atoms); nulls are those of random isotropic atoms of the target's size."""
    d = common["d"]
    rows = [
        ResultRow(
            metric=f"mmcs_{src}_to_{dst}",
            value=float(cos.mean()),
            ci_low=ci.low if ci else float("nan"),
            ci_high=ci.high if ci else float("nan"),
            null_value=mmcs_null_isotropic(f_dst, d, exact=True, absolute=absolute),
            null_name="random_isotropic",
            **common,
        )
    ]
    for tau in taus:
        rows.append(
            ResultRow(
                metric=schema.overlap(src, dst, tau),
                value=float((cos >= tau).double().mean()),
                null_value=overlap_null_isotropic(tau, f_dst, d, absolute),
                null_name="random_isotropic",
                **common,
            )
        )
    return rows


def seed_vs_seed(A_seed0, A_seed1, absolute: bool = False, alive_0=None, alive_1=None, **where: Any) -> list[ResultRow]:
    """MMCS between two training seeds of the same SAE (mean of both directions), labelled as the seed-vs-seed
    control: metric ``mmcs_seed_vs_seed``, null_name "seed_vs_seed". Read cross-SAE MMCS against it.
    Pass the alive masks of both seeds (``alive_0``, ``alive_1``): the ceiling must use the same kind of atom set
    as the MMCS it bounds (dead latents' random decoder rows drag it down)."""
    ab, ba = best_match_both(A_seed0, A_seed1, absolute, alive_0, alive_1, with_index=False)
    d = as_tensor(A_seed0, "A_seed0", ndim=2).shape[1]
    vals = torch.cat([ab.cosine, ba.cosine]).double()
    return [
        ResultRow(
            family=FAMILY,
            metric=schema.MMCS_SEED_VS_SEED,
            value=float(vals.mean()),
            null_name="seed_vs_seed",
            n=vals.numel(),
            d=d,
            note=f"{'absolute' if absolute else 'signed'} cosines, mean of both directions"
            + (", alive atoms" if alive_0 is not None or alive_1 is not None else ", all atoms"),
            extra={"a_to_b": float(ab.cosine.double().mean()), "b_to_a": float(ba.cosine.double().mean())},
            **where,
        )
    ]


__all__ = ["CompareOptions", "compare_dictionaries", "seed_vs_seed"]
