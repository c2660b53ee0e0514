"""Feature families across ranks and seeds: which adapter-SAE features persist, which are specific, which split.

Two dictionaries (e.g. the SAEs of the rank-4 and rank-8 adapters, or two seeds of one SAE) are matched one-to-one
on alive decoder atoms (Hungarian on 1 − cos, :func:`lorascope.geometry.matching.hungarian_match`). A matched pair
counts only if its cosine clears a threshold set from the random-dictionary null: for a unit atom and F_B random
unit atoms in R^d, each cosine t satisfies (t + 1)/2 ~ Beta((d−1)/2, (d−1)/2) (the first coordinate of a uniform
point on the sphere), so the maximum over F_B atoms has CDF F(x)^{F_B}. The threshold is its ``quantile``, taken
family-wise over the F_A atoms tested (per-atom level quantile^{1/F_A}), so random dictionaries match nothing
with probability ``quantile``.

Labels of an atom of A against B: ``split`` when ≥ 2 atoms of B clear the threshold (one-to-many, the
feature-splitting picture of Bricken et al. 2023, "Towards Monosemanticity"), else ``persistent`` when its
Hungarian partner clears it, else ``specific`` (rank- or seed-specific). Stability of a reference feature =
fraction of other dictionaries (seeds) whose matching reproduces it; features are ranked by stability × Δ energy.
Matching features across SAE seeds to judge their reliability follows Paulo & Belrose 2025 ("Sparse Autoencoders
Trained on the Same Data Learn Different Features").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor, same_dim
from lorascope.geometry.matching import hungarian_match

LABELS = ("persistent", "split", "specific")


def random_match_threshold(d: int, n_other: int, n_tested: int = 1, quantile: float = 0.99) -> float:
    """Cosine that the best of ``n_other`` random unit atoms in R^d exceeds, for any of ``n_tested`` atoms, with
    probability 1 − ``quantile`` (exact for independent uniform atoms; see the module docstring)."""
    from scipy.stats import beta

    if d < 2 or n_other < 1 or n_tested < 1 or not 0 < quantile < 1:
        raise LorascopeError(
            f"bad null parameters d={d}, n_other={n_other}, n_tested={n_tested}, quantile={quantile}",
            fix="d >= 2, counts >= 1, 0 < quantile < 1",
        )
    # P(one cosine > x) = p with (1 − p)^{n_other·n_tested} = quantile; computed in log space for accuracy
    p = -math.expm1(math.log(quantile) / (n_other * n_tested))
    a = (d - 1) / 2
    return float(2.0 * beta.isf(p, a, a) - 1.0)


def _counts_above(An: torch.Tensor, Bn: torch.Tensor, threshold: float, chunk: int = 2048) -> np.ndarray:
    out = []
    for s in range(0, An.shape[0], chunk):
        out.append(((An[s : s + chunk] @ Bn.T) >= threshold).sum(1))
    return torch.cat(out).numpy()


def _unit(W: torch.Tensor) -> torch.Tensor:
    W = W.float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class FamilyMatch:
    """Per atom of A (original indices): Hungarian partner in B (−1 if none), its cosine, the number of B atoms
    above the threshold, and the label; plus the threshold used."""

    table: pd.DataFrame  # columns: a, b, cosine, n_above, label
    threshold: float

    def counts(self) -> dict[str, int]:
        vc = self.table["label"].value_counts()
        return {label: int(vc.get(label, 0)) for label in LABELS}


def match_families(
    A, B, alive_a=None, alive_b=None, threshold: float | None = None, quantile: float = 0.99
) -> FamilyMatch:
    """Label every alive atom of decoder A [F_A, d] against decoder B [F_B, d] (see the module docstring)."""
    A = as_tensor(A, "A", ndim=2)
    B = as_tensor(B, "B", ndim=2)
    same_dim(A, B, "A", "B")
    idx_a = torch.arange(A.shape[0]) if alive_a is None else torch.nonzero(torch.as_tensor(alive_a)).flatten()
    idx_b = torch.arange(B.shape[0]) if alive_b is None else torch.nonzero(torch.as_tensor(alive_b)).flatten()
    if len(idx_a) == 0 or len(idx_b) == 0:
        raise LorascopeError("a dictionary has no alive atoms", fix="check the SAEs' densities")
    if threshold is None:
        threshold = random_match_threshold(A.shape[1], len(idx_b), len(idx_a), quantile)
    pairs = hungarian_match(A, B, alive_a, alive_b).set_index("a")
    n_above = _counts_above(_unit(A[idx_a]), _unit(B[idx_b]), threshold)
    rows = []
    for i, a in enumerate(idx_a.tolist()):
        b, cos = (int(pairs.at[a, "b"]), float(pairs.at[a, "cosine"])) if a in pairs.index else (-1, float("nan"))
        label = "split" if n_above[i] >= 2 else "persistent" if b >= 0 and cos >= threshold else "specific"
        rows.append({"a": a, "b": b, "cosine": cos, "n_above": int(n_above[i]), "label": label})
    return FamilyMatch(pd.DataFrame(rows), float(threshold))


def seed_stability(
    reference, others: Sequence, alive_ref=None, alive_others: Sequence | None = None, quantile: float = 0.99
) -> pd.Series:
    """Fraction of the ``others`` dictionaries (other seeds) whose Hungarian matching gives each alive reference
    atom a partner above the random-dictionary threshold; indexed by reference atom."""
    if not others:
        raise LorascopeError("stability needs at least one other seed's dictionary", fix="train >= 2 SAE seeds")
    alive_others = [None] * len(others) if alive_others is None else list(alive_others)
    hits = None
    for other, alive_o in zip(others, alive_others, strict=True):
        fm = match_families(reference, other, alive_ref, alive_o, quantile=quantile)
        t = fm.table.set_index("a")
        ok = (t["b"] >= 0) & (t["cosine"] >= fm.threshold)
        hits = ok.astype(float) if hits is None else hits + ok.astype(float)
    return (hits / len(others)).rename("stability")


def rank_by_stability(stability: pd.Series, delta_energy) -> pd.DataFrame:
    """Features ranked by stability × Δ energy (``delta_energy`` [F]: e.g. Σ_t a_f(t)² ‖d_f‖² on held-out Δ)."""
    energy = torch.as_tensor(delta_energy, dtype=torch.float64).numpy()
    idx = stability.index.to_numpy()
    out = pd.DataFrame({"feature": idx, "stability": stability.to_numpy(), "delta_energy": energy[idx]})
    out["score"] = out["stability"] * out["delta_energy"]
    return out.sort_values(["score", "feature"], ascending=[False, True], ignore_index=True)


__all__ = ["LABELS", "FamilyMatch", "match_families", "random_match_threshold", "rank_by_stability", "seed_stability"]
