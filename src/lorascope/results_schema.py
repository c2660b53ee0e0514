"""The results table's metric names: every statistic a study writes, with what it measures, the control it is read
against and the unit its bootstrap interval resamples. Producers build rows under these names and the report reads
them from here, so ``grep FVU_REF_DIFF`` finds both ends.

Names with a parameter (a threshold, an adapter, a pair of subspaces, a reconstruction method) are built by the
functions below; :func:`lookup` finds the :class:`Metric` of any name in a table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One statistic of the table: ``null`` is the ``null_name`` its rows carry ("" when none), ``ci`` the unit
    its bootstrap resamples ("" when it has no interval)."""

    family: str
    name: str
    description: str
    null: str = ""
    ci: str = ""


# ---- families ------------------------------------------------------------------------------------------------
DELTA_NORM = "delta_norm"
RECONSTRUCTION = "reconstruction"
DENSITY = "density"
DECODER_SIMILARITY = "decoder_similarity"
SUBSPACE = "subspace"
CKA = "cka"
SPLICE = "splice"
LORA = "lora"
ABSORPTION = "absorption"

# ---- nulls (the null_name column) ------------------------------------------------------------------------------
NULL_RANDOM_ISOTROPIC = "random_isotropic"
NULL_SEED_VS_SEED = "seed_vs_seed"
NULL_COV_MATCHED = "cov_matched_random"
NULL_INIT = "SAE at initialisation"
NULL_NOISE_MATCHED = "isotropic_noise_matched_norm"
NULL_ANALYTIC = "analytic_expectation"
NULL_RANDOM_SUBSPACE = "random_subspace"

# ---- Δ norms ---------------------------------------------------------------------------------------------------
DELTA_NORM_STATS = ("mean", "median", "p90", "p99")
DELTA_NORM_MEAN = "delta_norm_mean"
REL_DELTA_NORM_MEAN = "rel_delta_norm_mean"
BASE_NORM_MEAN = "base_norm_mean"
EFFECTIVE_RANK_PR = "effective_rank_pr"
PCA_K90 = "pca_k90"


def delta_norm(stat: str) -> str:
    """‖Δ_t‖ summary over held-out tokens: ``delta_norm_{mean|median|p90|p99}``."""
    return f"delta_norm_{stat}"


def rel_delta_norm(stat: str) -> str:
    """‖Δ_t‖ / ‖h_base,t‖ summary: ``rel_delta_norm_{mean|median|p90|p99}``."""
    return f"rel_delta_norm_{stat}"


# ---- reconstruction of held-out Δ ------------------------------------------------------------------------------
ADAPTER_SAE = "adapter_sae"  # the adapter SAE on Δ
REF_ON_DELTA = "ref_on_delta"  # the reference SAE applied to Δ
REF_DIFF = "ref_diff"  # SAE_ref(h_ft) − SAE_ref(h_base)
REF_LSTSQ_ACTIVE = "ref_lstsq_active"  # least squares on the reference atoms active on h_ft or h_base
NOISE = "noise"  # isotropic noise of Δ's norm (the null)
RECON_METHODS = (ADAPTER_SAE, REF_ON_DELTA, REF_DIFF, REF_LSTSQ_ACTIVE, NOISE)


def fvu(method: str) -> str:
    return f"fvu_{method}"


def mse(method: str) -> str:
    return f"mse_{method}"


def cos(method: str) -> str:
    return f"cos_{method}"


FVU_ADAPTER_SAE = fvu(ADAPTER_SAE)
FVU_REF_ON_DELTA = fvu(REF_ON_DELTA)
FVU_REF_DIFF = fvu(REF_DIFF)
FVU_REF_LSTSQ_ACTIVE = fvu(REF_LSTSQ_ACTIVE)
FVU_NOISE = fvu(NOISE)
FVU_REF_ON_BASE = "fvu_ref_on_base"
RECON_IMPROVEMENT_PCT = "recon_improvement_pct"

# ---- density ---------------------------------------------------------------------------------------------------
L0_ADAPTER_SAE = "l0_adapter_sae"
DEAD_FRACTION_ADAPTER_SAE = "dead_fraction_adapter_sae"
ALIVE_LATENTS_ADAPTER_SAE = "alive_latents_adapter_sae"
MEAN_DENSITY_ADAPTER_SAE = "mean_density_adapter_sae"
L0_REF_ON_DELTA = "l0_ref_on_delta"
L0_REF_ON_BASE = "l0_ref_on_base"

# ---- decoder similarity ----------------------------------------------------------------------------------------
MMCS_ADAPTER_TO_REF = "mmcs_adapter_to_ref"
MMCS_REF_TO_ADAPTER = "mmcs_ref_to_adapter"
MMCS_SEED_VS_SEED = "mmcs_seed_vs_seed"
MMCS_ADAPTER_TO_COV_MATCHED = "mmcs_adapter_to_cov_matched"
MMCS_INIT_TO_REF = "mmcs_init_to_ref"
HUNGARIAN_MEAN_COS = "hungarian_mean_cos"
OVERLAP_ADAPTER_TO_REF = "overlap_adapter_to_ref@"  # prefix of overlap(ADAPTER, REF, tau)


def mmcs(src: str, dst: str) -> str:
    """Mean over ``src``'s atoms of the best cosine to ``dst``'s atoms."""
    return f"mmcs_{src}_to_{dst}"


def overlap(src: str, dst: str, tau: float) -> str:
    """Fraction of ``src``'s atoms whose best cosine to ``dst`` is ≥ τ: ``overlap_{src}_to_{dst}@{tau}``."""
    return f"overlap_{src}_to_{dst}@{tau:g}"


def overlap_tau(name: str) -> float:
    """The threshold τ of an overlap metric name."""
    return float(name.split("@")[1])


# ---- subspaces -------------------------------------------------------------------------------------------------
PCA_DELTA_VS_REF_TOPK = "pca_delta_vs_ref_topk"
PCA_DELTA_VS_ADAPTER_TOPK = "pca_delta_vs_adapter_topk"
ADAPTER_TOPK_VS_REF_TOPK = "adapter_topk_vs_ref_topk"
PCA_DELTA_VS_LORA_COLSPACE = "pca_delta_vs_lora_colspace"
MEAN_COS2 = "mean_cos2_"  # prefix of mean_cos2(pair)


def mean_cos2(pair: str) -> str:
    return f"mean_cos2_{pair}"


def largest_angle_deg(pair: str) -> str:
    return f"largest_angle_deg_{pair}"


def smallest_angle_deg(pair: str) -> str:
    return f"smallest_angle_deg_{pair}"


def principal_angles_array(pair: str) -> str:
    """Name of the per-(layer, adapter) array of principal angles of ``pair``."""
    return f"principal_angles_{pair}"


# ---- CKA -------------------------------------------------------------------------------------------------------
CKA_CODES_ADAPTER_VS_REF = "cka_codes_adapter_vs_ref"
CKA_DELTA_VS = "cka_delta_vs_"  # prefix of cka_delta_vs(adapter)


def cka_delta_vs(adapter: str) -> str:
    """Linear CKA between this row's adapter's Δ and ``adapter``'s Δ on the same tokens."""
    return f"cka_delta_vs_{adapter}"


# ---- splice ----------------------------------------------------------------------------------------------------
KL_ADAPTED_VS_BASE = "kl_adapted_vs_base"


def kl_recovered(method: str) -> str:
    return f"kl_recovered_{method}"


KL_RECOVERED_ADAPTER_SAE = kl_recovered(ADAPTER_SAE)
KL_RECOVERED_REF_DIFF = kl_recovered(REF_DIFF)

# ---- LoRA training ---------------------------------------------------------------------------------------------
TRAIN_LOSS_START = "train_loss_start"
TRAIN_LOSS_END = "train_loss_end"
HELDOUT_LOSS_BASE = "heldout_loss_base"
HELDOUT_LOSS_ADAPTED = "heldout_loss_adapted"

# ---- absorption (lorascope absorption) -------------------------------------------------------------------------
ABSORPTION_FRACTION = "absorption_fraction"
FULL_ABSORPTION_RATE = "full_absorption_rate"
SPLITTING_K = "splitting_k"
PROBE_LETTERS_PASSING = "probe_letters_passing"

# ---- the catalogue ---------------------------------------------------------------------------------------------
_FIXED = [
    Metric(DELTA_NORM, BASE_NORM_MEAN, "mean ‖h_base,t‖ over held-out tokens"),
    Metric(DELTA_NORM, EFFECTIVE_RANK_PR, "participation ratio (Σλ)²/Σλ² of Δ's covariance"),
    Metric(DELTA_NORM, PCA_K90, "PCA components for 90% of Δ's variance"),
    Metric(RECONSTRUCTION, FVU_REF_ON_BASE, "FVU of the reference SAE on held-out base activations"),
    Metric(RECONSTRUCTION, RECON_IMPROVEMENT_PCT, "100·(FVU_ref − FVU_adapter)/FVU_ref on held-out Δ"),
    Metric(DENSITY, L0_ADAPTER_SAE, "active adapter-SAE latents per held-out Δ token", ci="token"),
    Metric(DENSITY, DEAD_FRACTION_ADAPTER_SAE, "fraction of adapter-SAE latents never active on held-out Δ"),
    Metric(DENSITY, ALIVE_LATENTS_ADAPTER_SAE, "adapter-SAE latents active at least once on held-out Δ"),
    Metric(DENSITY, MEAN_DENSITY_ADAPTER_SAE, "mean firing rate of the adapter-SAE latents"),
    Metric(DENSITY, L0_REF_ON_DELTA, "active reference-SAE latents per held-out Δ token"),
    Metric(DENSITY, L0_REF_ON_BASE, "active reference-SAE latents per held-out base token"),
    Metric(DECODER_SIMILARITY, MMCS_ADAPTER_TO_REF, "mean best cosine of adapter atoms to reference atoms",
           NULL_RANDOM_ISOTROPIC, "atom"),
    Metric(DECODER_SIMILARITY, MMCS_REF_TO_ADAPTER, "mean best cosine of reference atoms to adapter atoms",
           NULL_RANDOM_ISOTROPIC, "atom"),
    Metric(DECODER_SIMILARITY, MMCS_SEED_VS_SEED, "MMCS between two seeds of the adapter SAE (the ceiling)",
           NULL_SEED_VS_SEED),
    Metric(DECODER_SIMILARITY, MMCS_ADAPTER_TO_COV_MATCHED, "MMCS to the reference of random atoms with Δ's "
           "covariance", NULL_COV_MATCHED),
    Metric(DECODER_SIMILARITY, MMCS_INIT_TO_REF, "MMCS to the reference of an SAE at initialisation", NULL_INIT),
    Metric(DECODER_SIMILARITY, HUNGARIAN_MEAN_COS, "mean cosine of the one-to-one (Hungarian) matching of alive "
           "atoms"),
    Metric(CKA, CKA_CODES_ADAPTER_VS_REF, "linear CKA of adapter-SAE vs reference-SAE codes on Δ"),
    Metric(SPLICE, KL_ADAPTED_VS_BASE, "mean KL(p_adapted ‖ p_base) over held-out tokens"),
    Metric(LORA, TRAIN_LOSS_START, "LoRA training loss over the first steps"),
    Metric(LORA, TRAIN_LOSS_END, "LoRA training loss over the last steps"),
    Metric(LORA, HELDOUT_LOSS_BASE, "base model's loss on held-out fine-tuning examples"),
    Metric(LORA, HELDOUT_LOSS_ADAPTED, "adapted model's loss on held-out fine-tuning examples"),
    Metric(ABSORPTION, ABSORPTION_FRACTION, "SAEBench absorption fraction (first-letter task)"),
    Metric(ABSORPTION, FULL_ABSORPTION_RATE, "SAEBench full absorption rate"),
    Metric(ABSORPTION, SPLITTING_K, "latents needed to match the probe (feature splitting)"),
    Metric(ABSORPTION, PROBE_LETTERS_PASSING, "letters whose linear probe passes the F1 bar"),
]
METRICS: dict[str, Metric] = {m.name: m for m in _FIXED}

_METHODS = "|".join(RECON_METHODS)
_PAIRS = "|".join((PCA_DELTA_VS_REF_TOPK, PCA_DELTA_VS_ADAPTER_TOPK, ADAPTER_TOPK_VS_REF_TOPK,
                   PCA_DELTA_VS_LORA_COLSPACE))
# (pattern, family, description, null, ci unit) for the names built by the functions above
_PATTERNS = [
    (rf"(rel_)?delta_norm_({'|'.join(DELTA_NORM_STATS)})", DELTA_NORM, "‖Δ_t‖ (or ‖Δ_t‖/‖h_base,t‖) summary", "",
     "token"),
    (rf"fvu_({_METHODS})", RECONSTRUCTION, "fraction of Δ's variance unexplained by the method",
     NULL_NOISE_MATCHED, "token"),
    (rf"(mse|cos)_({_METHODS})", RECONSTRUCTION, "mean squared error / cosine of the method's Δ̂", "", ""),
    (r"overlap_(adapter_to_ref|ref_to_adapter)@[0-9.]+", DECODER_SIMILARITY,
     "fraction of atoms whose best match is ≥ τ", NULL_RANDOM_ISOTROPIC, ""),
    (rf"mean_cos2_({_PAIRS})", SUBSPACE, "mean cos² of the principal angles of two rank-k subspaces",
     NULL_RANDOM_SUBSPACE, ""),
    (rf"(largest|smallest)_angle_deg_({_PAIRS})", SUBSPACE, "largest / smallest principal angle (degrees)", "", ""),
    (r"cka_delta_vs_.+", CKA, "linear CKA of Δ across adapters on the same tokens", "", ""),
    (rf"kl_recovered_({_METHODS})", SPLICE, "1 − KL(adapted ‖ spliced)/KL(adapted ‖ base)", "", ""),
]


def lookup(name: str) -> Metric | None:
    """The catalogue entry of a metric name (fixed or built by one of the functions above), or None."""
    if name in METRICS:
        return METRICS[name]
    for pattern, family, description, null, ci in _PATTERNS:
        if re.fullmatch(pattern, name):
            return Metric(family, name, description, null, ci)
    return None


# ---- checkpoint sequences (adapters.load: {name: {checkpoints: DIR}}) ------------------------------------------
# Every checkpoint is an adapter of its own, named ``<name>_step_<N>`` (lorascope.models.finetunes), so all the
# per-adapter rows above exist per checkpoint; one ``checkpoint_step`` row per checkpoint carries its step.
CHECKPOINT = "checkpoint"
CHECKPOINT_STEP = "checkpoint_step"
_CHECKPOINT_METRIC = Metric(CHECKPOINT, CHECKPOINT_STEP, "training step of this checkpoint (value; its sequence's "
                                                         "name in note)")
_FIXED.append(_CHECKPOINT_METRIC)
METRICS[CHECKPOINT_STEP] = _CHECKPOINT_METRIC
