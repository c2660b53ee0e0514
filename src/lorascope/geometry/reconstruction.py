"""How well do dictionaries reconstruct held-out deltas Δ = h_ft - h_base, against controls.

Methods (each scored with :class:`ReconstructionStats` on Δ: FVU about Δ's dataset mean, MSE, mean cosine):
- ``adapter_sae``:        adapter SAE on Δ (skipped when no adapter SAE is given).
- ``ref_sae_on_delta``:   reference SAE applied to Δ directly (JumpReLU SAEs mostly stay below threshold on
                          small-norm deltas and return ~b_dec — the reason for the next controls).
- ``ref_sae_difference``: SAE_ref(h_ft) - SAE_ref(h_base).
- ``ref_active_lstsq``:   per token, least squares of Δ_t on the reference decoder rows active on h_ft at t
                          (the best any code on that active set could do).
- ``isotropic_noise``:    a random direction per token rescaled to ‖Δ_t‖. E‖Δ_t - n_t‖² = 2‖Δ_t‖² (independent
                          direction: the cross term vanishes), so E[FVU] = 2·Σ‖Δ_t‖² / Σ‖Δ_t - μ‖², which is 2
                          for mean-zero Δ and larger otherwise; it is reported as that row's null_value. It is a
                          sanity floor, not the null of the other rows.
Null of every dictionary's FVU row: 1, the FVU of predicting Δ's mean (``mean_predictor``). The verdict "the
adapter SAE reconstructs Δ" is read against the *best* control (the lower FVU of ``ref_sae_difference`` and
``ref_active_lstsq``), through the paired row ``fvu_gap_adapter_sae_vs_best_control`` = FVU(adapter SAE) −
FVU(best control) with an interval from the same resamples (see geometry.verdicts.reconstruction_verdict).
Intervals: ``bootstrap="document"`` (pass ``doc_ids`` to ``update``) resamples documents, the unit every study
row must use; "token" and "batch" are kept for callers without document ids.
Least squares is batched: active indices are padded to the batch's largest active set, the padded
[tokens, k, d] rows are gathered in float64 in token chunks, and the small normal equations G = W_S W_Sᵀ are
solved by eigendecomposition keeping eigenvalues > ``rtol``·λ_max (a pseudo-inverse: collinear atoms or k >
d are handled; with rtol = 1e-10 directions with singular value < 1e-5·s_max are dropped).
SAEs: any object with ``encode(x) -> codes [N, F]``, ``decode(codes) -> [N, d]`` and ``W_dec [F, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorascope.errors import LorascopeError
from lorascope.geometry._array import as_tensor, paired_activations, same_dim
from lorascope.geometry.bootstrap import _percentiles, fvu_unit_samples
from lorascope.geometry.metrics import ReconstructionStats
from lorascope.results import ResultRow

METHODS = ("adapter_sae", "ref_sae_on_delta", "ref_sae_difference", "ref_active_lstsq", "isotropic_noise")
CONTROLS = ("ref_sae_difference", "ref_active_lstsq")  # the candidates for the best control
FVU_NULL = 1.0  # FVU of the mean predictor
BOOTSTRAP_UNITS = {"token": "token", "batch": "batch", "document": "document"}


def _check_sae(sae: Any, name: str, d: int | None = None) -> None:
    for attr in ("encode", "decode", "W_dec"):
        if not hasattr(sae, attr):
            raise LorascopeError(f"{name} has no {attr}", fix="pass an SAE with encode(), decode() and W_dec [F, d]")
    if d is not None and sae.W_dec.shape[-1] != d:
        raise LorascopeError(
            f"{name} has d_in = {sae.W_dec.shape[-1]} but the activations have d = {d}",
            fix="use SAEs trained for this layer's width",
        )


def lstsq_on_active_atoms(delta, W_dec, active, rtol: float = 1e-10, max_elems: int = 2**23) -> torch.Tensor:
    """Per-token least-squares projection of ``delta`` [N, d] on the rows of ``W_dec`` [F, d] where
    ``active`` [N, F] is true. Returns [N, d] float64 (zero for tokens with no active atom)."""
    D = as_tensor(delta, "delta", torch.float64, ndim=2)
    W = as_tensor(W_dec, "W_dec", ndim=2)
    act = as_tensor(active, "active", ndim=2, check_finite=False) != 0
    same_dim(D, W, "delta", "W_dec")
    if act.shape != (D.shape[0], W.shape[0]):
        raise LorascopeError(
            f"active mask is {tuple(act.shape)}, expected {(D.shape[0], W.shape[0])}",
            fix="pass codes of the same tokens from the same SAE",
        )
    n, d = D.shape
    out = torch.zeros_like(D)
    k_t = act.sum(1)
    kmax = int(k_t.max()) if n else 0
    if kmax == 0:
        return out
    rows, cols = act.nonzero(as_tuple=True)
    starts = torch.cumsum(k_t, 0) - k_t
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    idx = torch.zeros(n, kmax, dtype=torch.int64, device=act.device)
    valid = torch.zeros(n, kmax, dtype=torch.bool, device=act.device)
    idx[rows, pos] = cols
    valid[rows, pos] = True
    W = W.to(D.device)
    step = max(1, max_elems // (kmax * d))
    for s in range(0, n, step):
        sl = slice(s, s + step)
        Wg = W[idx[sl]].to(torch.float64) * valid[sl, :, None]  # [b, k, d]
        G = Wg @ Wg.transpose(1, 2)
        r = Wg @ D[sl, :, None]
        lam, V = torch.linalg.eigh(G)
        keep = lam > rtol * lam[:, -1:].clamp_min(1e-300)
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        coef = V @ (inv[:, :, None] * (V.transpose(1, 2) @ r))
        out[sl] = (Wg.transpose(1, 2) @ coef)[:, :, 0]
    return out


class DeltaReconstruction:
    """Streaming accumulator of the five reconstructions of Δ (see module docstring).

    ``bootstrap``: "document" keeps per-document sums (``update(..., doc_ids=)`` required; a document may span
    updates) for document-level FVU intervals — use this; "token" keeps per-token errors and Δ (float32, N x d);
    "batch" keeps per-update sums (a block bootstrap over the batches you feed); None keeps nothing.
    """

    def __init__(
        self,
        reference_sae: Any,
        adapter_sae: Any = None,
        seed: int = 0,
        bootstrap: str | None = None,
        rtol: float = 1e-10,
    ) -> None:
        _check_sae(reference_sae, "reference SAE")
        if adapter_sae is not None:
            _check_sae(adapter_sae, "adapter SAE")
        if bootstrap not in (None, *BOOTSTRAP_UNITS):
            raise LorascopeError(f"bootstrap = {bootstrap!r}", fix='use "document", "token", "batch" or None')
        self.ref, self.adapter, self.bootstrap, self.rtol = reference_sae, adapter_sae, bootstrap, rtol
        self.methods = [m for m in METHODS if m != "adapter_sae" or adapter_sae is not None]
        self.stats = {m: ReconstructionStats() for m in self.methods}
        self._gen = torch.Generator().manual_seed(seed)
        self._units: dict[str, list[torch.Tensor]] = {"err": [], "sq": [], "xsum": [], "count": [], "id": []}

    @staticmethod
    def _run(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
        codes = sae.encode(x)
        return codes, sae.decode(codes).to(torch.float64)

    @torch.no_grad()
    def update(self, h_base, h_ft, doc_ids=None) -> None:
        """Add a batch: h_base, h_ft [n, d] activations of the same tokens; doc_ids [n] (int) their documents."""
        hb, hf = paired_activations(h_base, h_ft)
        if self.bootstrap == "document" and doc_ids is None:
            raise LorascopeError(
                "bootstrap='document' needs doc_ids for every update", fix="pass the store's doc_index of these rows"
            )
        _check_sae(self.ref, "reference SAE", hb.shape[1])
        dev = self.ref.W_dec.device
        hb, hf = hb.to(dev), hf.to(dev)
        delta = hf - hb
        recon: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if self.adapter is not None:
            _check_sae(self.adapter, "adapter SAE", hb.shape[1])
            codes, xh = self._run(self.adapter, delta)
            recon["adapter_sae"] = (xh.to(dev), codes)
        codes, xh = self._run(self.ref, delta)
        recon["ref_sae_on_delta"] = (xh, codes)
        codes_ft, xh_ft = self._run(self.ref, hf)
        _, xh_b = self._run(self.ref, hb)
        recon["ref_sae_difference"] = (xh_ft - xh_b, None)
        recon["ref_active_lstsq"] = (
            lstsq_on_active_atoms(delta, self.ref.W_dec, codes_ft, self.rtol),
            codes_ft,
        )
        g = torch.randn(delta.shape, generator=self._gen, dtype=torch.float64).to(dev)
        recon["isotropic_noise"] = (g * (delta.norm(dim=1) / g.norm(dim=1))[:, None], None)
        errs = []
        for m in self.methods:
            xh, codes = recon[m]
            self.stats[m].update(delta, xh, codes)
            errs.append(((delta - xh) ** 2).sum(1))
        if self.bootstrap is not None:
            self._keep_units(torch.stack(errs, 1).cpu(), delta, doc_ids)

    def _keep_units(self, err: torch.Tensor, delta: torch.Tensor, doc_ids) -> None:
        sq = (delta * delta).sum(1).cpu()
        if self.bootstrap == "token":
            parts = (err, sq, delta.to(torch.float32).cpu(), torch.ones(delta.shape[0], dtype=torch.float64))
        elif self.bootstrap == "batch":
            parts = (
                err.sum(0, keepdim=True),
                sq.sum(0, keepdim=True),
                delta.sum(0, keepdim=True).cpu(),
                torch.tensor([float(delta.shape[0])], dtype=torch.float64),
            )
        else:
            ids = as_tensor(doc_ids, "doc_ids", check_finite=False).reshape(-1).to(torch.int64).cpu()
            if ids.numel() != delta.shape[0]:
                raise LorascopeError(
                    f"doc_ids has {ids.numel()} entries for {delta.shape[0]} tokens", fix="pass one document id per row"
                )
            uniq, inv = torch.unique(ids, return_inverse=True)
            u = uniq.numel()
            z = lambda *shape: torch.zeros(u, *shape, dtype=torch.float64)  # noqa: E731
            parts = (
                z(err.shape[1]).index_add_(0, inv, err),
                z().index_add_(0, inv, sq),
                z(delta.shape[1]).index_add_(0, inv, delta.cpu().to(torch.float64)),
                z().index_add_(0, inv, torch.ones(ids.numel(), dtype=torch.float64)),
            )
            self._units["id"].append(uniq)
        for key, part in zip(("err", "sq", "xsum", "count"), parts, strict=True):
            self._units[key].append(part)

    def _unit_sums(self) -> dict[str, torch.Tensor]:
        u = {k: torch.cat(v).to(torch.float64) for k, v in self._units.items() if v}
        if self.bootstrap != "document":
            return u
        uniq, inv = torch.unique(u.pop("id"), return_inverse=True)  # a document may span several updates
        return {
            k: torch.zeros(uniq.numel(), *v.shape[1:], dtype=torch.float64).index_add_(0, inv, v) for k, v in u.items()
        }

    def noise_fvu_expectation(self) -> float:
        """E[FVU] of the isotropic-noise control on the data seen: 2·Σ‖Δ_t‖² / Σ‖Δ_t - μ‖²."""
        s = self.stats["isotropic_noise"]
        return 2 * s.sum_sq_x / s.total_variance

    def rows(self, n_boot: int = 0, alpha: float = 0.05, seed: int = 0, **where: Any) -> list[ResultRow]:
        """Rows (family "reconstruction"): fvu/mse/cosine per method (+ l0 where codes exist).

        FVU rows of the dictionaries carry null_value 1 ("mean_predictor"); the noise row its own expectation.
        With ``n_boot`` > 0 and bootstrap on: FVU intervals (``extra["ci_unit"]`` says what was resampled) and,
        when an adapter SAE is present, ``fvu_gap_adapter_sae_vs_best_control`` (paired over resamples; its
        ``extra["best_control"]`` names the control; null 0).
        """
        if self.stats["isotropic_noise"].n == 0:
            raise LorascopeError("no tokens seen", fix="call update() with at least one batch")
        cis, samples = None, None
        unit = BOOTSTRAP_UNITS.get(self.bootstrap or "", "")
        if n_boot > 0 and self.bootstrap is not None:
            u = self._unit_sums()
            point, samples = fvu_unit_samples(u["err"], u["sq"], u["xsum"], u["count"], n_boot, seed)
            lo, hi = _percentiles(samples, alpha)
            cis = {m: (float(lo[j]), float(hi[j])) for j, m in enumerate(self.methods)}
        out = []
        for m in self.methods:
            s = self.stats[m]
            common = dict(family="reconstruction", n=s.n, d=s.d, dtype="float64", **where)
            is_noise = m == "isotropic_noise"
            fvu_row = ResultRow(
                metric=f"fvu_{m}",
                value=s.fvu,
                null_value=self.noise_fvu_expectation() if is_noise else FVU_NULL,
                null_name="analytic_expectation" if is_noise else "mean_predictor",
                note=f"bootstrap over {unit}s" if cis else "",
                extra={"ci_unit": unit} if cis else {},
                **common,
            )
            if cis:
                fvu_row.ci_low, fvu_row.ci_high = cis[m]
            out += [
                fvu_row,
                ResultRow(metric=f"mse_{m}", value=s.mse, **common),
                ResultRow(metric=f"cosine_{m}", value=s.cosine, **common),
            ]
            if s.n_codes:
                out.append(ResultRow(metric=f"l0_{m}", value=s.l0, **common))
        if samples is not None and "adapter_sae" in self.methods:
            out.append(self._gap_row(samples, alpha, unit, where))
        return out

    def _gap_row(self, samples: torch.Tensor, alpha: float, unit: str, where: dict) -> ResultRow:
        """FVU(adapter SAE) − FVU(best control), the interval from the same resamples (paired)."""
        best = min(CONTROLS, key=lambda m: self.stats[m].fvu)
        j_ad, j_best = self.methods.index("adapter_sae"), self.methods.index(best)
        lo, hi = _percentiles(samples[:, j_ad] - samples[:, j_best], alpha)
        s = self.stats["adapter_sae"]
        return ResultRow(
            family="reconstruction",
            metric="fvu_gap_adapter_sae_vs_best_control",
            value=s.fvu - self.stats[best].fvu,
            ci_low=float(lo),
            ci_high=float(hi),
            null_value=0.0,
            null_name="best_control",
            n=s.n,
            d=s.d,
            dtype="float64",
            note=f"FVU(adapter SAE) - FVU({best}); bootstrap over {unit}s, paired",
            extra={"best_control": best, "ci_unit": unit},
            **where,
        )


@dataclass(frozen=True)
class ReconstructionOptions:
    """Settings of :func:`delta_reconstruction`: rows per ``batch_size`` update, ``seed`` of the noise control and
    of the bootstrap, ``n_boot`` bootstrap resamples (0: no intervals) at level 1 − ``alpha``."""

    batch_size: int = 4096
    seed: int = 0
    n_boot: int = 0
    alpha: float = 0.05


def delta_reconstruction(
    h_base,
    h_ft,
    reference_sae: Any,
    adapter_sae: Any = None,
    options: ReconstructionOptions | None = None,
    doc_ids=None,
    **where: Any,
) -> list[ResultRow]:
    """In-memory convenience: feed h_base, h_ft [N, d] in batches to :class:`DeltaReconstruction`; bootstrap
    intervals for FVU when ``options.n_boot`` > 0, over documents when ``doc_ids`` [N] is given (the study must
    pass it), else over tokens. ``options``: :class:`ReconstructionOptions` (None: its defaults). ``where``:
    layer=, adapter=, rank= for the rows."""
    opt = options or ReconstructionOptions()
    batch_size, seed, n_boot, alpha = opt.batch_size, opt.seed, opt.n_boot, opt.alpha
    hb = as_tensor(h_base, "h_base", ndim=2)
    hf = as_tensor(h_ft, "h_ft", ndim=2)
    mode = None if n_boot <= 0 else ("document" if doc_ids is not None else "token")
    acc = DeltaReconstruction(reference_sae, adapter_sae, seed=seed, bootstrap=mode)
    ids = None if doc_ids is None else as_tensor(doc_ids, "doc_ids", check_finite=False).reshape(-1)
    if ids is not None and ids.numel() != hb.shape[0]:
        raise LorascopeError(
            f"doc_ids has {ids.numel()} entries but h_base has {hb.shape[0]} rows", fix="pass one document id per row"
        )
    for s in range(0, hb.shape[0], batch_size):
        acc.update(hb[s : s + batch_size], hf[s : s + batch_size], None if ids is None else ids[s : s + batch_size])
    return acc.rows(n_boot=n_boot, alpha=alpha, seed=seed, **where)


__all__ = [
    "CONTROLS",
    "FVU_NULL",
    "METHODS",
    "DeltaReconstruction",
    "ReconstructionOptions",
    "delta_reconstruction",
    "lstsq_on_active_atoms",
]
