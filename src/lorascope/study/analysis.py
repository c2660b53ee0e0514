"""The study's statistics for one layer: every number the report shows, each with its control.

Input is in memory and model-free: held-out base activations and, per adapter, deltas of the same tokens, plus
the adapter SAEs (several seeds) and the reference SAE. Output is tidy rows (lorascope.results.ResultRow) and
per-(layer, adapter) arrays for distribution plots. The measure stage feeds it; notebooks can call it directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from lorascope import results_schema as schema
from lorascope.errors import LorascopeError
from lorascope.geometry import (
    CompareOptions,
    DeltaNormStats,
    ReconstructionOptions,
    SelectionSplit,
    alignment_nulls,
    atom_energy,
    best_match_cosines,
    cka_permutation_null,
    compare_dictionaries,
    compare_subspaces,
    delta_reconstruction,
    document_bootstrap_mean_ci,
    linear_cka_both,
    lora_column_space,
    mmcs,
    n_components_for_variance,
    participation_ratio,
    pca_basis,
    principal_angles,
    random_isotropic_dictionary,
    seed_ceiling,
    selection_aware_overlap_on,
    selection_split,
    top_k_atoms,
    unit_bootstrap_ci,
)
from lorascope.geometry.bootstrap import _percentiles, fvu_bootstrap_samples
from lorascope.geometry.density import token_norms
from lorascope.results import ResultRow
from lorascope.saes import SAE, create_sae


@dataclass
class LayerAdapterInputs:
    """``doc_index`` [N]: the store's document of every held-out row (the unit every interval resamples);
    ``train_delta_cov`` [d, d]: Δ's covariance on *training* documents (the covariance-matched null)."""

    layer: int
    adapter: str
    rank: int
    h_base: torch.Tensor  # [N, d] held-out tokens
    delta: torch.Tensor  # [N, d] h_adapted - h_base for the same tokens
    adapter_saes: list[SAE]  # one per seed (>= 1)
    reference: SAE
    lora_update: tuple[torch.Tensor, torch.Tensor] | None = None  # (B [d, r], A [r, d_in]) of this layer's output map
    doc_index: torch.Tensor | None = None  # [N]; None: every token its own document (token bootstrap)
    train_delta_cov: torch.Tensor | None = None


MIN_SEEDS_FOR_CI = 5  # fewer adapter-SAE seeds: MMCS's interval resamples atoms (labelled "atom")


@dataclass
class Settings:
    taus: tuple[float, ...] = (0.5, 0.7, 0.9)
    subspace_k: int = 16
    n_boot: int = 200
    cka_max_tokens: int = 4000
    seed: int = 0
    cka_permutations: int = 49
    subspace_draws: int = 10


class _Cell(NamedTuple):
    """One (layer, adapter)'s held-out tensors and what the stages before the subspaces computed from them."""

    hb: torch.Tensor
    h_ft: torch.Tensor
    delta: torch.Tensor
    docs: torch.Tensor
    codes_ad: torch.Tensor
    alive: torch.Tensor
    alive_ref: torch.Tensor


@dataclass
class LayerAdapterResult:
    rows: list[ResultRow] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def _codes(sae: SAE, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([sae.encode(x[i : i + batch].to(sae.W_enc.dtype)) for i in range(0, x.shape[0], batch)])


def _docs(inp: LayerAdapterInputs) -> torch.Tensor:
    n = inp.delta.shape[0]
    return torch.arange(n) if inp.doc_index is None else torch.as_tensor(inp.doc_index).reshape(-1)[:n].long()


def analyse_layer_adapter(inp: LayerAdapterInputs, s: Settings) -> LayerAdapterResult:
    """Delta norms, reconstruction with controls, density, decoder similarity with nulls, subspaces, code CKA."""
    where = {"layer": inp.layer, "adapter": inp.adapter, "rank": inp.rank}
    out = LayerAdapterResult()
    hb, delta = inp.h_base.float(), inp.delta.float()
    h_ft = hb + delta
    docs = _docs(inp)
    _delta_norms(out, hb, h_ft, delta, docs, s, where)
    out.rows += _reconstruction(hb, h_ft, inp, docs, s, where)
    codes_ad, codes_ref, alive = _density(out, inp, delta, docs, s, where)
    alive_ref = reference_alive(inp.reference, h_ft, delta)
    _decoder_similarity(out, inp, delta, alive, alive_ref, s, where)
    _subspaces(out, inp, _Cell(hb, h_ft, delta, docs, codes_ad, alive, alive_ref), s, where)
    m = min(delta.shape[0], s.cka_max_tokens)
    if m >= 4:
        out.rows += cka_rows(
            codes_ad[:m],
            codes_ref[:m],
            docs[:m],
            schema.CKA_CODES_ADAPTER_VS_REF,
            s,
            "adapter-SAE vs reference-SAE codes on Δ",
            where,
        )
    return out


def reference_alive(reference: SAE, h_ft: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Atoms of the reference alive on the kind of data it was trained on: Δ for an SAE trained on deltas
    (metadata trained_on = "delta", e.g. an A/A control), h_ft otherwise (a reference of the model's activations
    mostly stays below threshold on Δ, so Δ would call most of its atoms dead)."""
    on = delta if reference.cfg.metadata.get("trained_on") == "delta" else h_ft
    return _codes(reference, on).ne(0).any(0)


def cka_rows(X, Y, docs, name: str, s: Settings, what: str, where: dict) -> list[ResultRow]:
    """Debiased linear CKA with its document-permutation null (mean as null_value; 95th percentile, p-value and
    the biased estimate as companion rows). Too few documents for the null: the value alone, null NaN."""
    n, d = X.shape[0], X.shape[1]
    common = dict(family=schema.CKA, n=n, d=d, **where)
    # columns that are zero on every row (dead latents) add nothing to X Xᵀ: dropping them is exact and halves
    # the Gram's N²·F cost for sparse codes
    X, Y = X[:, X.ne(0).any(0)], Y[:, Y.ne(0).any(0)]
    if X.shape[1] == 0 or Y.shape[1] == 0:
        return []
    debiased, biased = linear_cka_both(X, Y)
    try:
        res = cka_permutation_null(X, Y, docs, n_perm=s.cka_permutations, seed=s.seed, value=debiased)
    except LorascopeError:
        return [
            ResultRow(
                metric=name,
                value=debiased,
                note=f"debiased linear CKA of {what}; too few documents for a permutation null",
                **common,
            )
        ]
    note = (
        f"debiased linear CKA of {what}; null: {res.n_perm} re-pairings of {res.n_docs} documents × "
        f"{res.doc_length} tokens"
    )
    return [
        ResultRow(
            metric=name,
            value=res.value,
            null_value=res.null_mean,
            null_name=schema.NULL_DOC_PERMUTATION,
            note=note,
            **common,
        ),
        ResultRow(metric=schema.cka_extra(name, "null_q95"), value=res.null_q95, **common),
        ResultRow(metric=schema.cka_extra(name, "p"), value=res.p_value, **common),
        ResultRow(
            metric=schema.cka_extra(name, "biased"),
            value=biased,
            note="biased estimator (labelled extra: ≈ 0.45 for independent TopK codes)",
            **common,
        ),
    ]


def _delta_norms(out: LayerAdapterResult, hb, h_ft, delta, docs, s: Settings, where: dict) -> None:
    """‖Δ‖ and ‖Δ‖/‖h_base‖ summaries (document-bootstrap CIs on the means) and the effective rank of Δ."""
    n, d = delta.shape
    norms = DeltaNormStats()
    norms.update(hb, h_ft)
    tn = token_norms(hb, delta)
    dn, rel = tn.delta, tn.ratio
    per_token = {schema.DELTA_NORM_MEAN: dn, schema.REL_DELTA_NORM_MEAN: rel}
    for row in norms.rows(**where):
        v = per_token.get(row.metric)
        if v is not None and s.n_boot:
            ci = document_bootstrap_mean_ci(v, docs, n_boot=s.n_boot, seed=s.seed)
            row.ci_low, row.ci_high, row.ci_unit = ci.low, ci.high, ci.ci_unit
        out.rows.append(row)
    fam = schema.DELTA_NORM
    out.rows.append(ResultRow(fam, schema.BASE_NORM_MEAN, float(tn.base.mean()), n=n, d=d, **where))
    eig = torch.linalg.eigvalsh(torch.cov(delta.double().T)).flip(0).clamp_min(0)
    out.rows.append(
        ResultRow(
            fam,
            schema.EFFECTIVE_RANK_PR,
            participation_ratio(eig),
            n=n,
            d=d,
            note="participation ratio (Σλ)²/Σλ² of Δ's covariance",
            **where,
        )
    )
    out.rows.append(
        ResultRow(
            fam,
            schema.PCA_K90,
            float(n_components_for_variance(eig, 0.9)),
            n=n,
            d=d,
            note="PCA components for 90% of Δ's variance",
            **where,
        )
    )
    out.arrays["delta_norms"] = dn.float().numpy()
    out.arrays["rel_delta_norms"] = rel.float().numpy()


# geometry.delta_reconstruction's method labels -> the table's (lorascope.results_schema) method names
_RECON_METHOD = {
    "adapter_sae": schema.ADAPTER_SAE,
    "ref_sae_on_delta": schema.REF_ON_DELTA,
    "ref_sae_difference": schema.REF_DIFF,
    "ref_active_lstsq": schema.REF_LSTSQ_ACTIVE,
    "isotropic_noise": schema.NOISE,
}
_RECON_STAT = {"fvu": schema.fvu, "mse": schema.mse, "cosine": schema.cos}  # l0 rows: the density family has them


def _reconstruction(hb, h_ft, inp: LayerAdapterInputs, docs, s: Settings, where: dict) -> list[ResultRow]:
    """FVU/MSE/cosine of held-out Δ: adapter SAE, reference SAE and the controls (document-bootstrap FVU
    intervals, null = the mean predictor), the paired gap to the best control, and the labelled extra
    improvement % against the reference SAE fed Δ."""
    rows = []
    opt = ReconstructionOptions(seed=s.seed, n_boot=s.n_boot)
    for r in delta_reconstruction(hb, h_ft, inp.reference, inp.adapter_saes[0], opt, doc_ids=docs, **where):
        r.ci_unit = r.extra.get("ci_unit", "")
        if r.metric == schema.FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL:
            r.null_name = schema.NULL_BEST_CONTROL
            best = _RECON_METHOD.get(r.extra.get("best_control", ""), "")
            r.note = f"FVU(adapter SAE) − FVU({best}), the best control; paired document bootstrap"
            rows.append(r)
            continue
        stat, method = r.metric.split("_", 1)
        if stat in _RECON_STAT and method in _RECON_METHOD:
            r.metric = _RECON_STAT[stat](_RECON_METHOD[method])
            rows.append(r)
    rows += init_control_rows(inp.adapter_saes[0], h_ft - hb, docs, s, where)
    vals = {r.metric: r.value for r in rows}
    ad, ref = vals.get(schema.FVU_ADAPTER_SAE), vals.get(schema.FVU_REF_ON_DELTA)
    if ad is not None and ref:
        rows.append(
            ResultRow(
                schema.RECONSTRUCTION,
                schema.RECON_IMPROVEMENT_PCT,
                100.0 * (ref - ad) / ref,
                note="extra: 100·(FVU_ref_on_delta − FVU_adapter)/FVU_ref_on_delta, against the "
                "weakest control; not a verdict",
                **where,
            )
        )
    return rows


def _density(out: LayerAdapterResult, inp: LayerAdapterInputs, delta, docs, s: Settings, where: dict):
    """L0, dead/alive latents and mean density of the adapter SAE on Δ; the reference SAE's L0 on Δ.
    Returns (adapter codes, reference codes, alive mask)."""
    n, d = delta.shape
    fam = schema.DENSITY
    codes_ad = _codes(inp.adapter_saes[0], delta)
    active = codes_ad != 0
    density = active.double().mean(0)
    l0 = active.sum(1).double()
    ci = document_bootstrap_mean_ci(l0, docs, n_boot=s.n_boot, seed=s.seed) if s.n_boot else None
    out.rows.append(
        ResultRow(
            fam,
            schema.L0_ADAPTER_SAE,
            float(l0.mean()),
            ci_low=ci.low if ci else float("nan"),
            ci_high=ci.high if ci else float("nan"),
            ci_unit=ci.ci_unit if ci else "",
            n=n,
            d=d,
            **where,
        )
    )
    out.rows.append(
        ResultRow(
            fam,
            schema.DEAD_FRACTION_ADAPTER_SAE,
            float((density == 0).double().mean()),
            n=n,
            d=d,
            note=f"no activation on {n} held-out tokens",
            **where,
        )
    )
    out.rows.append(ResultRow(fam, schema.ALIVE_LATENTS_ADAPTER_SAE, float((density > 0).sum()), n=n, d=d, **where))
    out.rows.append(ResultRow(fam, schema.MEAN_DENSITY_ADAPTER_SAE, float(density.mean()), n=n, d=d, **where))
    codes_ref = _codes(inp.reference, delta)
    out.rows.append(
        ResultRow(fam, schema.L0_REF_ON_DELTA, float((codes_ref != 0).sum(1).double().mean()), n=n, d=d, **where)
    )
    out.arrays["density_adapter"] = density.float().numpy()
    out.arrays["density_ref_on_delta"] = (codes_ref != 0).double().mean(0).float().numpy()
    return codes_ad, codes_ref, density > 0


def init_sae(sae: SAE, fallback_seed: int | None = None) -> SAE | None:
    """The SAE as it was before training (its recorded ``init_seed``); without a recorded seed, a fresh
    initialisation from ``fallback_seed`` (None: no SAE)."""
    seed = sae.cfg.metadata.get("init_seed", fallback_seed)
    if seed is None:
        return None
    c = sae.cfg
    return create_sae(
        c.architecture,
        c.d_in,
        c.d_sae,
        seed=int(seed),
        dtype=c.dtype,
        apply_b_dec_to_input=c.apply_b_dec_to_input,
        **c.arch,
    )


def init_decoder(sae: SAE) -> torch.Tensor | None:
    """The decoder this SAE started from (its recorded ``init_seed``), or None when the seed is not recorded."""
    init = init_sae(sae)
    return None if init is None else init.W_dec.detach().float()


@torch.no_grad()
def _sq_errors(sae: SAE, delta: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([((x - sae(x.to(sae.W_enc.dtype)).float()) ** 2).sum(1).double() for x in delta.split(batch)])


def init_control_rows(sae0: SAE, delta, docs, s: Settings, where: dict) -> list[ResultRow]:
    """The adapter SAE's architecture at initialisation, fed Δ: a dictionary that learned nothing but still picks
    its atoms by looking at Δ (which the reference controls do not). ``fvu_sae_init`` and the paired gap
    FVU(adapter SAE) − FVU(SAE at init) over the same document resamples."""
    init = init_sae(sae0, fallback_seed=987_654 + s.seed)
    if init is None or not s.n_boot or int(torch.unique(docs).numel()) < 2:
        return []
    err = torch.stack([_sq_errors(sae0, delta), _sq_errors(init, delta)], 1)
    point, samples, u = fvu_bootstrap_samples(err, delta.double(), docs, n_boot=s.n_boot, seed=s.seed)
    lo, hi = _percentiles(samples[:, 1], 0.05)
    glo, ghi = _percentiles(samples[:, 0] - samples[:, 1], 0.05)
    n, d = delta.shape
    common = dict(family=schema.RECONSTRUCTION, n=n, d=d, ci_unit=schema.CI_DOCUMENT, **where)
    return [
        ResultRow(
            metric=schema.FVU_SAE_INIT,
            value=float(point[1]),
            ci_low=float(lo),
            ci_high=float(hi),
            null_value=1.0,
            null_name=schema.NULL_MEAN_PREDICTOR,
            note="the adapter SAE's architecture at its initialisation, fed Δ",
            **common,
        ),
        ResultRow(
            metric=schema.FVU_GAP_ADAPTER_SAE_VS_SAE_INIT,
            value=float(point[0] - point[1]),
            ci_low=float(glo),
            ci_high=float(ghi),
            null_value=0.0,
            null_name=schema.NULL_INIT,
            note=f"FVU(adapter SAE) − FVU(SAE at init); paired bootstrap over {u} documents",
            **common,
        ),
    ]


def _decoder_similarity(
    out: LayerAdapterResult, inp: LayerAdapterInputs, delta, alive, alive_ref, s: Settings, where: dict
) -> None:
    """MMCS(adapter → reference) over alive atoms of both, read against the strongest of three nulls
    (isotropic, covariance-matched on training Δ, the SAE at its real initialisation) and the seed-vs-seed
    ceiling over alive atoms. CI over seeds when there are ≥ MIN_SEEDS_FOR_CI, else over atoms (labelled)."""
    d = delta.shape[1]
    sae0 = inp.adapter_saes[0]
    W_ad, W_ref = sae0.W_dec.detach().float(), inp.reference.W_dec.detach().float()
    out.rows += _dictionary_rows(W_ad, W_ref, alive, alive_ref, s, where)
    seeds_W = [sae.W_dec.detach().float() for sae in inp.adapter_saes]
    seeds_alive = [alive] + [_codes(sae, delta).ne(0).any(0) for sae in inp.adapter_saes[1:]]
    per_seed = [mmcs(W, W_ref, alive_a=a, alive_b=alive_ref).a_to_b for W, a in zip(seeds_W, seeds_alive, strict=True)]
    best = best_match_cosines(W_ad, W_ref, alive_a=alive, alive_b=alive_ref).cosine
    # a percentile bootstrap over 2-4 seeds is about [min, max] of the seeds: both seeds above the null by chance
    # (p ≈ 1/4) would read as alignment, so seeds are the unit only from MIN_SEEDS_FOR_CI on; atoms otherwise
    ci = (
        unit_bootstrap_ci(per_seed, schema.CI_SEED, n_boot=max(s.n_boot, 100), seed=s.seed)
        if len(per_seed) >= MIN_SEEDS_FOR_CI
        else unit_bootstrap_ci(best, schema.CI_ATOM, n_boot=max(s.n_boot, 100), seed=s.seed)
    )
    nulls = alignment_nulls(
        W_ad,
        W_ref,
        delta_cov=inp.train_delta_cov,
        init_W=init_decoder(sae0),
        alive_adapter=alive,
        alive_reference=alive_ref,
        seed=s.seed,
    )
    n_al, n_ref = int(alive.sum()), int(alive_ref.sum())
    out.rows += _alignment_rows(float(per_seed[0]), ci, nulls, (n_al, n_ref, d), where)
    out.arrays["best_cos_adapter_to_ref"] = best.float().numpy()
    rand = random_isotropic_dictionary(max(n_ref, 1), d, seed=s.seed + 2)
    out.arrays["best_cos_null"] = best_match_cosines(W_ad[alive], rand).cosine.float().numpy()
    if len(seeds_W) > 1:
        out.rows.append(_seed_ceiling_row(seeds_W, seeds_alive, s, d, where))
        out.arrays["best_cos_seed"] = best_match_cosines(W_ad[alive], seeds_W[1]).cosine.float().numpy()


def _dictionary_rows(W_ad, W_ref, alive, alive_ref, s: Settings, where: dict) -> list[ResultRow]:
    """compare_dictionaries' rows (adapter vs reference, alive atoms), bar its MMCS(adapter → reference), which
    :func:`_alignment_rows` reports with the seed/atom interval and the strongest null."""
    opt = CompareOptions(seed=s.seed, taus=s.taus, n_boot=s.n_boot)
    rows = compare_dictionaries(W_ad, W_ref, "adapter", "ref", opt, alive_a=alive, alive_b=alive_ref, **where)
    for r in rows:
        r.ci_unit = schema.CI_ATOM if r.ci_low == r.ci_low else ""
    return [r for r in rows if r.metric != schema.MMCS_ADAPTER_TO_REF]


def _alignment_rows(value: float, ci, nulls, sizes: tuple[int, int, int], where: dict) -> list[ResultRow]:
    """The MMCS(adapter → reference) row against the strongest null, then one row per finite null;
    ``sizes``: (alive adapter atoms, alive reference atoms, d)."""
    fam = schema.DECODER_SIMILARITY
    n_al, n_ref, d = sizes
    rows = [
        ResultRow(
            fam,
            schema.MMCS_ADAPTER_TO_REF,
            value,
            ci_low=ci.low,
            ci_high=ci.high,
            ci_unit=ci.ci_unit,
            null_value=nulls.strongest,
            null_name=schema.NULL_STRONGEST_ALIGNMENT,
            n=n_al,
            d=d,
            note=f"alive atoms ({n_al} adapter, {n_ref} reference); strongest null: {nulls.strongest_name}",
            **where,
        )
    ]
    for name, v, null in (
        (schema.MMCS_NULL_ISOTROPIC, nulls.isotropic, schema.NULL_RANDOM_ISOTROPIC),
        (schema.MMCS_NULL_COV_MATCHED, nulls.cov_matched, schema.NULL_COV_MATCHED),
        (schema.MMCS_NULL_SAE_INIT, nulls.sae_init, schema.NULL_INIT),
    ):
        if v == v:
            rows.append(ResultRow(fam, name, float(v), null_name=null, n=n_al, d=d, **where))
    return rows


def _seed_ceiling_row(seeds_W: list, seeds_alive: list, s: Settings, d: int, where: dict) -> ResultRow:
    """MMCS between the first two seeds' alive atoms, both directions: the ceiling cross-SAE MMCS is read against."""
    ceil = seed_ceiling(seeds_W[0], seeds_W[1], seeds_alive[0], seeds_alive[1])
    cci = unit_bootstrap_ci(ceil, schema.CI_ATOM, n_boot=max(s.n_boot, 100), seed=s.seed)
    return ResultRow(
        schema.DECODER_SIMILARITY,
        schema.MMCS_SEED_VS_SEED,
        cci.value,
        ci_low=cci.low,
        ci_high=cci.high,
        ci_unit=cci.ci_unit,
        null_name=schema.NULL_SEED_VS_SEED,
        n=int(ceil.numel()),
        d=d,
        note="alive atoms of both seeds, mean of both directions (the ceiling)",
        **where,
    )


def _subspaces(out: LayerAdapterResult, inp: LayerAdapterInputs, c: _Cell, s: Settings, where: dict) -> None:
    """Rank-k subspaces (never the full spans of overcomplete dictionaries): Δ's PCA, the most used atoms of both
    SAEs, and the LoRA update's column space. k/d is the null only for the LoRA column space (chosen without
    looking at Δ); atoms selected on Δ are tested split-half against the same selection on random dictionaries."""
    hb, h_ft, delta, docs, codes_ad, alive, alive_ref = c
    d = delta.shape[1]
    k = min(s.subspace_k, d - 1, int(alive.sum()))
    if k < 1:
        return
    W_ad, W_ref = inp.adapter_saes[0].W_dec.detach().float(), inp.reference.W_dec.detach().float()
    pca = pca_basis(delta, k)
    ref_diff = _codes(inp.reference, h_ft) - _codes(inp.reference, hb)
    ref_top = top_k_atoms(W_ref, atom_energy(ref_diff, W_ref), k)
    ad_top = top_k_atoms(W_ad, atom_energy(codes_ad, W_ad), k)
    pairs = {
        schema.PCA_DELTA_VS_REF_TOPK: (pca, ref_top),
        schema.PCA_DELTA_VS_ADAPTER_TOPK: (pca, ad_top),
        schema.ADAPTER_TOPK_VS_REF_TOPK: (ad_top, ref_top),
    }
    if inp.lora_update is not None:
        col = lora_column_space(*inp.lora_update)
        pairs[schema.PCA_DELTA_VS_LORA_COLSPACE] = (pca[: col.shape[0]], col)
    for name, (A, B) in pairs.items():
        rows = compare_subspaces(A, B, name, **where)
        if name != schema.PCA_DELTA_VS_LORA_COLSPACE:  # selected on Δ: k/d does not apply (see selected_cos2_*)
            for r in rows:
                r.null_value, r.null_name = float("nan"), ""
        out.rows += rows
        out.arrays[schema.principal_angles_array(name)] = principal_angles(A, B).float().numpy()
    m = min(delta.shape[0], s.cka_max_tokens)
    if int(torch.unique(docs[:m]).numel()) < 4:
        return
    splits: dict[int, SelectionSplit] = {}  # one document split (PCA, null covariance) per k for both dictionaries
    for name, W in ((schema.PCA_DELTA_VS_ADAPTER_TOPK, W_ad[alive]), (schema.PCA_DELTA_VS_REF_TOPK, W_ref[alive_ref])):
        kk = min(k, W.shape[0])
        if kk < 1:
            continue
        if kk not in splits:
            splits[kk] = selection_split(delta[:m], docs[:m], kk, seed=s.seed)
        sel = selection_aware_overlap_on(W, splits[kk], n_draws=s.subspace_draws)
        note = (
            f"split-half: top-{kk} atoms by energy on half the documents vs PCA_k(Δ) of the other half; "
            f"null = same selection on random dictionaries ({sel.n_draws} draws); naive k/d = {sel.naive_null:.3g}"
        )
        out.rows.append(
            ResultRow(
                schema.SUBSPACE,
                schema.selected_cos2(name),
                sel.value,
                null_value=sel.null,
                null_name=schema.NULL_SELECTED_RANDOM,
                n=m,
                d=d,
                note=note,
                **where,
            )
        )
        out.rows.append(
            ResultRow(schema.SUBSPACE, schema.selected_cos2_null_q95(name), sel.null_q95, n=m, d=d, **where)
        )


def cross_adapter_cka(
    layer: int,
    deltas: dict[str, torch.Tensor],
    ranks: dict[str, int],
    doc_index=None,
    max_tokens: int = 4000,
    settings: Settings | None = None,
) -> list[ResultRow]:
    """Debiased linear CKA between the deltas of every pair of adapters on the same held-out tokens, with its
    document-permutation null (diagonal = 1, no null). ``doc_index`` [N]: documents of the rows."""
    s = settings or Settings()
    rows = []
    names = list(deltas)
    done: dict[tuple[str, str], list[ResultRow]] = {}
    for a in names:
        m = min(deltas[a].shape[0], max_tokens)
        docs = torch.arange(m) if doc_index is None else torch.as_tensor(doc_index).reshape(-1)[:m].long()
        for b in names:
            where = {"layer": layer, "adapter": a, "rank": ranks.get(a, -1)}
            if a == b:
                rows.append(
                    ResultRow(
                        schema.CKA,
                        schema.cka_delta_vs(b),
                        1.0,
                        n=m,
                        d=int(deltas[a].shape[1]),
                        note="CKA of Δ with itself",
                        **where,
                    )
                )
                continue
            if (b, a) in done:  # CKA is symmetric: copy the other orientation's rows
                rows += [
                    dataclasses.replace(
                        r, metric=r.metric.replace(schema.cka_delta_vs(a), schema.cka_delta_vs(b)), **where
                    )
                    for r in done[(b, a)]
                ]
                continue
            done[(a, b)] = cka_rows(
                deltas[a][:m], deltas[b][:m], docs, schema.cka_delta_vs(b), s, f"Δ of {a} vs Δ of {b}", where
            )
            rows += done[(a, b)]
    return rows
