"""The study's statistics for one layer: every number the report shows, each with its control.

Input is in memory and model-free: held-out base activations and, per adapter, deltas of the same tokens, plus
the adapter SAEs (several seeds) and the reference SAE. Output is tidy rows (lorascope.results.ResultRow) and
per-(layer, adapter) arrays for distribution plots. The measure stage feeds it; notebooks can call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lorascope import results_schema as schema
from lorascope.geometry import (
    DeltaNormStats,
    atom_energy,
    best_match_cosines,
    bootstrap_ci,
    compare_dictionaries,
    compare_subspaces,
    covariance_matched_dictionary,
    delta_reconstruction,
    linear_cka,
    lora_column_space,
    mmcs,
    n_components_for_variance,
    participation_ratio,
    pca_basis,
    principal_angles,
    random_isotropic_dictionary,
    seed_vs_seed,
    top_k_atoms,
)
from lorascope.geometry.density import token_norms
from lorascope.results import ResultRow
from lorascope.saes import SAE, create_sae


@dataclass
class LayerAdapterInputs:
    layer: int
    adapter: str
    rank: int
    h_base: torch.Tensor  # [N, d] held-out tokens
    delta: torch.Tensor  # [N, d] h_adapted - h_base for the same tokens
    adapter_saes: list[SAE]  # one per seed (>= 1)
    reference: SAE
    lora_update: tuple[torch.Tensor, torch.Tensor] | None = None  # (B [d, r], A [r, d_in]) of this layer's output map


@dataclass
class Settings:
    taus: tuple[float, ...] = (0.5, 0.7, 0.9)
    subspace_k: int = 16
    n_boot: int = 200
    cka_max_tokens: int = 4000
    seed: int = 0


@dataclass
class LayerAdapterResult:
    rows: list[ResultRow] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@torch.no_grad()
def _codes(sae: SAE, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    return torch.cat([sae.encode(x[i: i + batch].to(sae.W_enc.dtype)) for i in range(0, x.shape[0], batch)])


def analyse_layer_adapter(inp: LayerAdapterInputs, s: Settings) -> LayerAdapterResult:
    """Delta norms, reconstruction with controls, density, decoder similarity with nulls, subspaces, code CKA."""
    where = {"layer": inp.layer, "adapter": inp.adapter, "rank": inp.rank}
    out = LayerAdapterResult()
    hb, delta = inp.h_base.float(), inp.delta.float()
    h_ft = hb + delta
    _delta_norms(out, hb, h_ft, delta, s, where)
    out.rows += _reconstruction(hb, h_ft, inp, s, where)
    codes_ad, codes_ref, alive = _density(out, inp, delta, s, where)
    _decoder_similarity(out, inp, delta, alive, s, where)
    _subspaces(out, inp, hb, delta, codes_ad, alive, s, where)
    n, d = delta.shape
    m = min(n, s.cka_max_tokens)
    if m >= 4:
        out.rows.append(ResultRow(schema.CKA, schema.CKA_CODES_ADAPTER_VS_REF, linear_cka(codes_ad[:m], codes_ref[:m]),
                                  n=m, d=d, note="linear CKA of adapter-SAE vs reference-SAE codes on Δ", **where))
    return out


def _delta_norms(out: LayerAdapterResult, hb, h_ft, delta, s: Settings, where: dict) -> None:
    """‖Δ‖ and ‖Δ‖/‖h_base‖ summaries (bootstrap CIs on the means) and the effective rank of Δ."""
    n, d = delta.shape
    norms = DeltaNormStats()
    norms.update(hb, h_ft)
    tn = token_norms(hb, delta)
    dn, rel = tn.delta, tn.ratio
    per_token = {schema.DELTA_NORM_MEAN: dn, schema.REL_DELTA_NORM_MEAN: rel}
    for row in norms.rows(**where):
        v = per_token.get(row.metric)
        if v is not None and s.n_boot:
            ci = bootstrap_ci(v, n_boot=s.n_boot, seed=s.seed)
            row.ci_low, row.ci_high = ci.low, ci.high
        out.rows.append(row)
    fam = schema.DELTA_NORM
    out.rows.append(ResultRow(fam, schema.BASE_NORM_MEAN, float(tn.base.mean()), n=n, d=d, **where))
    eig = torch.linalg.eigvalsh(torch.cov(delta.double().T)).flip(0).clamp_min(0)
    out.rows.append(ResultRow(fam, schema.EFFECTIVE_RANK_PR, participation_ratio(eig), n=n, d=d,
                              note="participation ratio (Σλ)²/Σλ² of Δ's covariance", **where))
    out.rows.append(ResultRow(fam, schema.PCA_K90, float(n_components_for_variance(eig, 0.9)), n=n, d=d,
                              note="PCA components for 90% of Δ's variance", **where))
    out.arrays["delta_norms"] = dn.float().numpy()
    out.arrays["rel_delta_norms"] = rel.float().numpy()


# geometry.delta_reconstruction's method labels -> the table's (lorascope.results_schema) method names
_RECON_METHOD = {"adapter_sae": schema.ADAPTER_SAE, "ref_sae_on_delta": schema.REF_ON_DELTA,
                 "ref_sae_difference": schema.REF_DIFF, "ref_active_lstsq": schema.REF_LSTSQ_ACTIVE,
                 "isotropic_noise": schema.NOISE}
_RECON_STAT = {"fvu": schema.fvu, "mse": schema.mse, "cosine": schema.cos}  # l0 rows: the density family has them


def _reconstruction(hb, h_ft, inp: LayerAdapterInputs, s: Settings, where: dict) -> list[ResultRow]:
    """FVU/MSE/cosine of held-out Δ: adapter SAE, reference SAE and the controls, plus the improvement %."""
    rows = []
    for r in delta_reconstruction(hb, h_ft, inp.reference, inp.adapter_saes[0], seed=s.seed, n_boot=s.n_boot,
                                  **where):
        stat, method = r.metric.split("_", 1)
        if stat in _RECON_STAT:
            r.metric = _RECON_STAT[stat](_RECON_METHOD[method])
            rows.append(r)
    vals = {r.metric: r.value for r in rows}
    ad, ref = vals.get(schema.FVU_ADAPTER_SAE), vals.get(schema.FVU_REF_ON_DELTA)
    if ad is not None and ref:
        rows.append(ResultRow(schema.RECONSTRUCTION, schema.RECON_IMPROVEMENT_PCT, 100.0 * (ref - ad) / ref,
                              note="100·(FVU_ref − FVU_adapter)/FVU_ref on held-out Δ", **where))
    return rows


def _density(out: LayerAdapterResult, inp: LayerAdapterInputs, delta, s: Settings, where: dict):
    """L0, dead/alive latents and mean density of the adapter SAE on Δ; the reference SAE's L0 on Δ.
    Returns (adapter codes, reference codes, alive mask)."""
    n, d = delta.shape
    fam = schema.DENSITY
    codes_ad = _codes(inp.adapter_saes[0], delta)
    active = codes_ad != 0
    density = active.double().mean(0)
    l0 = active.sum(1).double()
    ci = bootstrap_ci(l0, n_boot=s.n_boot, seed=s.seed) if s.n_boot else None
    out.rows.append(ResultRow(fam, schema.L0_ADAPTER_SAE, float(l0.mean()), ci_low=ci.low if ci else float("nan"),
                              ci_high=ci.high if ci else float("nan"), n=n, d=d, **where))
    out.rows.append(ResultRow(fam, schema.DEAD_FRACTION_ADAPTER_SAE, float((density == 0).double().mean()),
                              n=n, d=d, note=f"no activation on {n} held-out tokens", **where))
    out.rows.append(ResultRow(fam, schema.ALIVE_LATENTS_ADAPTER_SAE, float((density > 0).sum()), n=n, d=d, **where))
    out.rows.append(ResultRow(fam, schema.MEAN_DENSITY_ADAPTER_SAE, float(density.mean()), n=n, d=d, **where))
    codes_ref = _codes(inp.reference, delta)
    out.rows.append(ResultRow(fam, schema.L0_REF_ON_DELTA, float((codes_ref != 0).sum(1).double().mean()), n=n,
                              d=d, **where))
    out.arrays["density_adapter"] = density.float().numpy()
    out.arrays["density_ref_on_delta"] = (codes_ref != 0).double().mean(0).float().numpy()
    return codes_ad, codes_ref, density > 0


def _decoder_similarity(out: LayerAdapterResult, inp: LayerAdapterInputs, delta, alive, s: Settings,
                        where: dict) -> None:
    """Adapter vs reference decoder atoms, with the isotropic, covariance-matched, initialisation and seed nulls."""
    d = delta.shape[1]
    sae0 = inp.adapter_saes[0]
    W_ad, W_ref = sae0.W_dec.detach().float(), inp.reference.W_dec.detach().float()
    out.rows += compare_dictionaries(W_ad, W_ref, "adapter", "ref", seed=s.seed, taus=s.taus, alive_a=alive,
                                     n_boot=s.n_boot, **where)
    cov_null = covariance_matched_dictionary(W_ad.shape[0], torch.cov(delta.double().T), seed=s.seed + 1)
    fam = schema.DECODER_SIMILARITY
    out.rows.append(ResultRow(fam, schema.MMCS_ADAPTER_TO_COV_MATCHED, mmcs(cov_null, W_ref).a_to_b,
                              null_name=schema.NULL_COV_MATCHED, n=W_ad.shape[0], d=d,
                              note="control: MMCS to the reference of random atoms drawn with Δ's covariance",
                              **where))
    init = create_sae(sae0.cfg.architecture, d, sae0.d_sae, seed=10_000 + s.seed, **sae0.cfg.arch)
    out.rows.append(ResultRow(fam, schema.MMCS_INIT_TO_REF, mmcs(init.W_dec.detach(), W_ref).a_to_b,
                              null_name=schema.NULL_INIT, n=init.d_sae, d=d, **where))
    out.arrays["best_cos_adapter_to_ref"] = best_match_cosines(W_ad[alive], W_ref).cosine.float().numpy()
    rand = random_isotropic_dictionary(W_ref.shape[0], d, seed=s.seed + 2)
    out.arrays["best_cos_null"] = best_match_cosines(W_ad[alive], rand).cosine.float().numpy()
    if len(inp.adapter_saes) > 1:
        W_seed = inp.adapter_saes[1].W_dec.detach().float()
        out.rows += seed_vs_seed(W_ad, W_seed, **where)
        out.arrays["best_cos_seed"] = best_match_cosines(W_ad[alive], W_seed).cosine.float().numpy()


def _subspaces(out: LayerAdapterResult, inp: LayerAdapterInputs, hb, delta, codes_ad, alive, s: Settings,
               where: dict) -> None:
    """Rank-k subspaces (never the full spans of overcomplete dictionaries): Δ's PCA, the most used atoms of both
    SAEs, and the LoRA update's column space."""
    d = delta.shape[1]
    k = min(s.subspace_k, d - 1, int(alive.sum()))
    if k < 1:
        return
    W_ad, W_ref = inp.adapter_saes[0].W_dec.detach().float(), inp.reference.W_dec.detach().float()
    h_ft = hb + delta
    pca = pca_basis(delta, k)
    ref_diff = _codes(inp.reference, h_ft) - _codes(inp.reference, hb)
    ref_top = top_k_atoms(W_ref, atom_energy(ref_diff, W_ref), k)
    ad_top = top_k_atoms(W_ad, atom_energy(codes_ad, W_ad), k)
    pairs = {schema.PCA_DELTA_VS_REF_TOPK: (pca, ref_top), schema.PCA_DELTA_VS_ADAPTER_TOPK: (pca, ad_top),
             schema.ADAPTER_TOPK_VS_REF_TOPK: (ad_top, ref_top)}
    if inp.lora_update is not None:
        col = lora_column_space(*inp.lora_update)
        pairs[schema.PCA_DELTA_VS_LORA_COLSPACE] = (pca[: col.shape[0]], col)
    for name, (A, B) in pairs.items():
        out.rows += compare_subspaces(A, B, name, **where)
        out.arrays[schema.principal_angles_array(name)] = principal_angles(A, B).float().numpy()


def cross_adapter_cka(layer: int, deltas: dict[str, torch.Tensor], ranks: dict[str, int],
                      max_tokens: int = 4000) -> list[ResultRow]:
    """Linear CKA between the deltas of every pair of adapters on the same held-out tokens (diagonal = 1)."""
    rows = []
    names = list(deltas)
    for a in names:
        for b in names:
            m = min(deltas[a].shape[0], max_tokens)
            v = 1.0 if a == b else linear_cka(deltas[a][:m], deltas[b][:m])
            rows.append(ResultRow(schema.CKA, schema.cka_delta_vs(b), v, layer=layer, adapter=a,
                                  rank=ranks.get(a, -1), n=m, d=int(deltas[a].shape[1]),
                                  note="linear CKA of Δ across adapters"))
    return rows
