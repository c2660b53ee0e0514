"""Feature density of free-L0 SAEs, measured where it means something.

arXiv 2605.28896 reports that "feature density (mean active features per token) increases with rank and depth".
That statement needs an SAE whose L0 is free (ReLU-L1, JumpReLU; a TopK SAE pins L0 at k), and a way to compare
sets of Δ rows whose scale and spectrum differ. Two readings are provided:

- **fixed coefficient**: train one SAE per set at the same sparsity coefficient on mean-norm-normalised inputs
  (the ``paper_a`` SAE normalises Δ by its mean norm, so the coefficient means the same thing for every set);
- **matched reconstruction**: find, per set, the coefficient at which the held-out FVU equals a target (bracket
  the target by multiplying the coefficient by ``factor``, then bisect in log-coefficient), training one
  separate SAE per coefficient, and read L0 there (interpolated linearly in FVU between the two runs that
  bracket the target). At equal FVU, a set that needs more active latents per token is denser in the sense of
  the claim; a set that only *looks* denser because it is harder to reconstruct is not.

Every number is on held-out rows. FVU is assumed to rise with the coefficient (true up to training noise); the
search reports ``bracketed=False`` and an L0 of NaN when ``max_runs`` training runs could not bracket the target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from lorascope.errors import LorascopeError
from lorascope.results import ResultRow
from lorascope.saes.base import create_sae, settings_class
from lorascope.saes.trainer import TrainerConfig, evaluate_sae, train_sae

COEFFICIENT_NAME = {"paper_a": "l1_coefficient", "relu": "l1_coefficient", "jumprelu": "l0_coefficient"}


@dataclass(frozen=True)
class DensitySpec:
    """Which SAE to train per run: a free-L0 architecture, its width, other arch settings, trainer, seed."""

    d_sae: int
    architecture: str = "paper_a"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    arch: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def check(self) -> None:
        if self.architecture not in COEFFICIENT_NAME:
            raise LorascopeError(
                f"density needs a free-L0 SAE; {self.architecture!r} is not one (TopK pins L0 at k)",
                fix=f"use one of: {', '.join(COEFFICIENT_NAME)}",
            )
        if COEFFICIENT_NAME[self.architecture] in self.arch:
            raise LorascopeError(
                f"DensitySpec.arch sets {COEFFICIENT_NAME[self.architecture]}, which the search chooses",
                fix="pass the coefficient as an argument instead",
            )


@dataclass(frozen=True)
class DensityRun:
    """One trained SAE, evaluated on held-out rows. ``l0`` = mean active latents per token (the paper's density)."""

    coefficient: float
    fvu: float
    l0: float
    density: float  # l0 / d_sae
    alive_fraction: float  # latents active on at least one held-out row
    seconds: float
    per_token_l0: Any = field(default=None, compare=False, repr=False)  # [N] float64 when held_out is a tensor


@dataclass
class MatchedDensity:
    """Density at the coefficient where held-out FVU = ``target_fvu``; ``runs`` lists every training run."""

    target_fvu: float
    l0: float
    coefficient: float
    bracketed: bool
    runs: list[DensityRun]

    def nearest(self) -> DensityRun:
        """The run whose FVU is closest to the target."""
        return min(self.runs, key=lambda r: abs(r.fvu - self.target_fvu))


def density_at_coefficient(train: Any, held_out: Any, coefficient: float, spec: DensitySpec) -> DensityRun:
    """Train one ``spec`` SAE at ``coefficient`` on ``train`` (a tensor [N, d] or a re-openable batch source);
    evaluate FVU and L0 on ``held_out``."""
    spec.check()
    if not coefficient >= 0 or not math.isfinite(coefficient):
        raise LorascopeError(f"sparsity coefficient {coefficient} is not a finite number >= 0", fix="use e.g. 0.2")
    d_in = _width(train)
    sae = create_sae(
        spec.architecture,
        d_in,
        spec.d_sae,
        seed=spec.seed,
        **{**spec.arch, COEFFICIENT_NAME[spec.architecture]: coefficient},
    )
    t0 = time.perf_counter()
    res = train_sae(sae, train, replace(spec.trainer, seed=spec.seed), progress=False)
    ev = evaluate_sae(res.sae, held_out)
    return DensityRun(
        float(coefficient),
        float(ev["fvu"]),
        float(ev["l0"]),
        float(ev["l0"]) / spec.d_sae,
        1.0 - float(ev["dead"]) / spec.d_sae,
        time.perf_counter() - t0,
        _per_token_l0(res.sae, held_out),
    )


def _per_token_l0(sae, held_out: Any):
    """Active latents of each held-out row [N] (float64), for document-level intervals; None for a batch source."""
    import torch

    if not isinstance(held_out, torch.Tensor):
        return None
    with torch.no_grad():
        x = held_out.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        return torch.cat([sae.encode(x[i : i + 4096]).ne(0).sum(1).double().cpu() for i in range(0, len(x), 4096)])


def density_at_matched_fvu(
    train: Any,
    held_out: Any,
    target_fvu: float,
    spec: DensitySpec,
    *,
    start: float | None = None,
    factor: float = 4.0,
    max_runs: int = 8,
    fvu_rtol: float = 0.05,
) -> MatchedDensity:
    """L0 of ``spec`` SAEs at the coefficient where held-out FVU reaches ``target_fvu`` (one training run per
    coefficient tried, at most ``max_runs``, the first at ``start``: default, the architecture's default
    coefficient); see the module docstring for the search."""
    spec.check()
    if not 0 < target_fvu < 1:
        raise LorascopeError(f"target_fvu = {target_fvu} must be in (0, 1)", fix="use e.g. 0.1")
    name = COEFFICIENT_NAME[spec.architecture]
    first = float(settings_class(spec.architecture).model_fields[name].default) if start is None else start
    return search_matched_fvu(
        lambda c: density_at_coefficient(train, held_out, c, spec),
        target_fvu,
        start=first,
        factor=factor,
        max_runs=max_runs,
        fvu_rtol=fvu_rtol,
    )


def search_matched_fvu(
    run_at: Callable[[float], DensityRun],
    target_fvu: float,
    *,
    start: float,
    factor: float = 4.0,
    max_runs: int = 8,
    fvu_rtol: float = 0.05,
) -> MatchedDensity:
    """Bracket then bisect (in log coefficient) for FVU = ``target_fvu``; ``run_at(c)`` trains and evaluates."""
    if not start > 0 or not factor > 1 or max_runs < 2:
        raise LorascopeError(
            f"bad search settings (start {start}, factor {factor}, max_runs {max_runs})",
            fix="use start > 0, factor > 1 and max_runs >= 2",
        )
    runs = [run_at(start)]
    below = runs[0] if runs[0].fvu <= target_fvu else None  # fvu <= target: coefficient too small (or exact)
    above = runs[0] if runs[0].fvu > target_fvu else None
    while len(runs) < max_runs and (below is None or above is None):
        c = below.coefficient * factor if above is None else above.coefficient / factor
        runs.append(run_at(c))
        if runs[-1].fvu <= target_fvu:
            below = runs[-1]
        else:
            above = runs[-1]
    while (
        below is not None
        and above is not None
        and len(runs) < max_runs
        and min(abs(below.fvu - target_fvu), abs(above.fvu - target_fvu)) > fvu_rtol * target_fvu
    ):
        runs.append(run_at(math.sqrt(below.coefficient * above.coefficient)))
        if runs[-1].fvu <= target_fvu:
            below = runs[-1]
        else:
            above = runs[-1]
    if below is None or above is None:
        return MatchedDensity(target_fvu, math.nan, math.nan, False, runs)
    t = (target_fvu - below.fvu) / (above.fvu - below.fvu)
    l0 = below.l0 + t * (above.l0 - below.l0)
    coef = math.exp(math.log(below.coefficient) + t * (math.log(above.coefficient) - math.log(below.coefficient)))
    return MatchedDensity(target_fvu, l0, coef, True, runs)


def density_rows(
    fixed: DensityRun | None, matched: MatchedDensity | None, d_sae: int, l0_ci: Any = None, **where: Any
) -> list[ResultRow]:
    """Rows (family "density") for one (layer, adapter): L0 and FVU at the fixed coefficient (``l0_ci``: an
    interval with ``low``/``high``/``ci_unit`` for that L0, e.g. a document bootstrap), and L0 and the
    coefficient at the matched FVU (the target in ``null_value``; NaN L0 when the search did not bracket it)."""
    rows: list[ResultRow] = []
    common = dict(family="density", d=d_sae, dtype="float32", **where)
    if fixed is not None:
        note = f"coefficient {fixed.coefficient:g}"
        ci = {} if l0_ci is None else {"ci_low": l0_ci.low, "ci_high": l0_ci.high, "ci_unit": l0_ci.ci_unit}
        rows += [
            ResultRow(metric="l0_fixed_coefficient", value=fixed.l0, note=note, **ci, **common),
            ResultRow(metric="fvu_fixed_coefficient", value=fixed.fvu, note=note, **common),
        ]
    if matched is not None:
        note = f"target FVU {matched.target_fvu:g}; {len(matched.runs)} runs" + (
            "" if matched.bracketed else "; target not bracketed"
        )
        rows += [
            ResultRow(metric="l0_matched_fvu", value=matched.l0, note=note, **common),
            ResultRow(metric="coefficient_matched_fvu", value=matched.coefficient, note=note, **common),
        ]
    return rows


def _width(train: Any) -> int:
    shape = getattr(train, "shape", None)
    if shape is not None and len(shape) == 2:
        return int(shape[1])
    from lorascope.saes._batches import BatchSource, take_rows

    head, _ = take_rows(BatchSource(train).open(0), 1)
    if head is None:
        raise LorascopeError("the training rows are empty", fix="pass at least one row of activations")
    return int(head.shape[1])


__all__ = [
    "DensityRun",
    "DensitySpec",
    "MatchedDensity",
    "density_at_coefficient",
    "density_at_matched_fvu",
    "density_rows",
    "search_matched_fvu",
]
