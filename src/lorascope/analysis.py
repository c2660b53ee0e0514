"""The study's statistics for one layer: every number the report shows, each with its control.

Input is in memory and model-free: held-out base activations and, per adapter, deltas of the same tokens, plus
the adapter SAEs (several seeds) and the reference SAE. Output is tidy rows (lorascope.results.ResultRow) and
per-(layer, adapter) arrays for distribution plots. The pipeline feeds it; notebooks can call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

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
    mmcs,
    n_components_for_variance,
    participation_ratio,
    pca_basis,
    principal_angles,
    random_isotropic_dictionary,
    seed_vs_seed,
    top_k_atoms,
)
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
    rows = out.rows
    hb, delta = inp.h_base.float(), inp.delta.float()
    h_ft = hb + delta
    n, d = delta.shape
    sae0 = inp.adapter_saes[0]

    # --- delta norms (bootstrap CIs on the means) and the effective rank of Δ -----------------------------------
    norms = DeltaNormStats()
    norms.update(hb, h_ft)
    dn = delta.double().norm(dim=1)
    rel = dn / hb.double().norm(dim=1).clamp_min(1e-30)
    for row in norms.rows(**where):
        v = {"delta_norm_mean": dn, "rel_delta_norm_mean": rel}.get(_rename(row.metric))
        if v is not None and s.n_boot:
            ci = bootstrap_ci(v, n_boot=s.n_boot, seed=s.seed)
            row.ci_low, row.ci_high = ci.low, ci.high
        rows.append(row)
    rows.append(ResultRow("delta_norm", "base_norm_mean", float(hb.double().norm(dim=1).mean()), n=n, d=d, **where))
    eig = torch.linalg.eigvalsh(torch.cov(delta.double().T)).flip(0).clamp_min(0)
    rows.append(ResultRow("delta_norm", "effective_rank_pr", participation_ratio(eig), n=n, d=d,
                          note="participation ratio (Σλ)²/Σλ² of Δ's covariance", **where))
    rows.append(ResultRow("delta_norm", "pca_k90", float(n_components_for_variance(eig, 0.9)), n=n, d=d,
                          note="PCA components for 90% of Δ's variance", **where))
    out.arrays["delta_norms"] = dn.float().numpy()
    out.arrays["rel_delta_norms"] = rel.float().numpy()

    # --- reconstruction of held-out Δ: adapter SAE, reference SAE, and the controls -----------------------------
    rows += delta_reconstruction(hb, h_ft, inp.reference, sae0, seed=s.seed, n_boot=s.n_boot, **where)

    # --- density ----------------------------------------------------------------------------------------------
    codes_ad = _codes(sae0, delta)
    active = codes_ad != 0
    density = active.double().mean(0)
    l0 = active.sum(1).double()
    ci = bootstrap_ci(l0, n_boot=s.n_boot, seed=s.seed) if s.n_boot else None
    rows.append(ResultRow("density", "l0_adapter_sae", float(l0.mean()), ci_low=ci.low if ci else float("nan"),
                          ci_high=ci.high if ci else float("nan"), n=n, d=d, **where))
    rows.append(ResultRow("density", "dead_fraction_adapter_sae", float((density == 0).double().mean()),
                          n=n, d=d, note=f"no activation on {n} held-out tokens", **where))
    rows.append(ResultRow("density", "alive_latents_adapter_sae", float((density > 0).sum()), n=n, d=d, **where))
    rows.append(ResultRow("density", "mean_density_adapter_sae", float(density.mean()), n=n, d=d, **where))
    codes_ref = _codes(inp.reference, delta)
    rows.append(ResultRow("density", "l0_ref_on_delta", float((codes_ref != 0).sum(1).double().mean()), n=n, d=d,
                          **where))
    out.arrays["density_adapter"] = density.float().numpy()
    out.arrays["density_ref_on_delta"] = (codes_ref != 0).double().mean(0).float().numpy()

    # --- decoder similarity with nulls --------------------------------------------------------------------------
    W_ad, W_ref = sae0.W_dec.detach().float(), inp.reference.W_dec.detach().float()
    alive = density > 0
    rows += compare_dictionaries(W_ad, W_ref, "adapter", "ref", seed=s.seed, taus=s.taus, alive_a=alive,
                                 n_boot=s.n_boot, **where)
    cov = torch.cov(delta.double().T)
    cov_null = covariance_matched_dictionary(W_ad.shape[0], cov, seed=s.seed + 1)
    rows.append(ResultRow("decoder_similarity", "mmcs_adapter_to_cov_matched", mmcs(cov_null, W_ref).a_to_b,
                          null_name="cov_matched_random", n=W_ad.shape[0], d=d,
                          note="control: MMCS to the reference of random atoms drawn with Δ's covariance", **where))
    init = create_sae(sae0.cfg.architecture, d, sae0.d_sae, seed=10_000 + s.seed, **sae0.cfg.arch)
    rows.append(ResultRow("decoder_similarity", "mmcs_init_to_ref", mmcs(init.W_dec.detach(), W_ref).a_to_b,
                          null_name="SAE at initialisation", n=init.d_sae, d=d, **where))
    out.arrays["best_cos_adapter_to_ref"] = best_match_cosines(W_ad[alive], W_ref).cosine.float().numpy()
    rand = random_isotropic_dictionary(W_ref.shape[0], d, seed=s.seed + 2)
    out.arrays["best_cos_null"] = best_match_cosines(W_ad[alive], rand).cosine.float().numpy()
    if len(inp.adapter_saes) > 1:
        W_seed = inp.adapter_saes[1].W_dec.detach().float()
        rows += seed_vs_seed(W_ad, W_seed, "adapter", **where)
        out.arrays["best_cos_seed"] = best_match_cosines(W_ad[alive], W_seed).cosine.float().numpy()

    # --- subspaces: rank-k, never the full spans of overcomplete dictionaries -----------------------------------
    k = min(s.subspace_k, d - 1, int(alive.sum()))
    if k >= 1:
        pca = pca_basis(delta, k)
        ref_diff = _codes(inp.reference, h_ft) - _codes(inp.reference, hb)
        ref_top = top_k_atoms(W_ref, atom_energy(ref_diff, W_ref), k)
        ad_top = top_k_atoms(W_ad, atom_energy(codes_ad, W_ad), k)
        for name, (A, B) in {"pca_delta_vs_ref_topk": (pca, ref_top),
                             "pca_delta_vs_adapter_topk": (pca, ad_top),
                             "adapter_topk_vs_ref_topk": (ad_top, ref_top)}.items():
            rows += compare_subspaces(A, B, name, **where)
            out.arrays[f"principal_angles_{name}"] = principal_angles(A, B).float().numpy()
        if inp.lora_update is not None:
            from lorascope.geometry import lora_column_space

            col = lora_column_space(*inp.lora_update)
            rows += compare_subspaces(pca[: col.shape[0]], col, "pca_delta_vs_lora_colspace", **where)
            out.arrays["principal_angles_pca_delta_vs_lora_colspace"] = principal_angles(
                pca[: col.shape[0]], col).float().numpy()

    # --- CKA between adapter-SAE codes and reference-SAE codes on Δ -------------------------------------------
    m = min(n, s.cka_max_tokens)
    if m >= 4:
        rows.append(ResultRow("cka", "cka_codes_adapter_vs_ref", linear_cka(codes_ad[:m], codes_ref[:m]), n=m,
                              d=d, note="linear CKA of adapter-SAE vs reference-SAE codes on Δ", **where))
    _normalise_names(out.rows)
    _add_improvement(out.rows, where)
    return out


# geometry's function-level names -> the study's table names (the contract the report reads)
_RENAMES = {"relative_delta_norm": "rel_delta_norm", "ref_sae_on_delta": "ref_on_delta",
            "ref_sae_difference": "ref_diff", "ref_active_lstsq": "ref_lstsq_active", "isotropic_noise": "noise",
            "mmcs_seed_vs_seed_adapter": "mmcs_seed_vs_seed", "matched_cosine_adapter_ref": "hungarian_mean_cos"}


def _rename(metric: str) -> str:
    for old, new in _RENAMES.items():
        metric = metric.replace(old, new)
    if metric.startswith("cosine_"):
        metric = "cos_" + metric[len("cosine_"):]
    if metric.startswith("overlap") and "_" in metric:  # overlap0.5_adapter_to_ref -> overlap_adapter_to_ref@0.5
        tau, rest = metric[len("overlap"):].split("_", 1)
        metric = f"overlap_{rest}@{tau}"
    return metric


def _normalise_names(rows: list[ResultRow]) -> None:
    # L0 of each reconstruction method duplicates the density family's rows: keep those only
    rows[:] = [r for r in rows if not (r.family == "reconstruction" and r.metric.startswith("l0_"))]
    for r in rows:
        r.metric = _rename(r.metric)


def _add_improvement(rows: list[ResultRow], where: dict) -> None:
    vals = {r.metric: r.value for r in rows if r.family == "reconstruction"}
    ad, ref = vals.get("fvu_adapter_sae"), vals.get("fvu_ref_on_delta")
    if ad is not None and ref:
        rows.append(ResultRow("reconstruction", "recon_improvement_pct", 100.0 * (ref - ad) / ref,
                              note="100·(FVU_ref − FVU_adapter)/FVU_ref on held-out Δ", **where))


def cross_adapter_cka(layer: int, deltas: dict[str, torch.Tensor], ranks: dict[str, int],
                      max_tokens: int = 4000) -> list[ResultRow]:
    """Linear CKA between the deltas of every pair of adapters on the same held-out tokens (diagonal = 1)."""
    rows = []
    names = list(deltas)
    for a in names:
        for b in names:
            m = min(deltas[a].shape[0], max_tokens)
            v = 1.0 if a == b else linear_cka(deltas[a][:m], deltas[b][:m])
            rows.append(ResultRow("cka", f"cka_delta_vs_{b}", v, layer=layer, adapter=a, rank=ranks.get(a, -1), n=m,
                                  d=int(deltas[a].shape[1]), note="linear CKA of Δ across adapters"))
    return rows
