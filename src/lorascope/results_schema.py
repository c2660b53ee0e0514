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
EXPLAIN = "explain"
SPLIT = "split"

# ---- nulls (the null_name column) ------------------------------------------------------------------------------
NULL_RANDOM_ISOTROPIC = "random_isotropic"
NULL_SEED_VS_SEED = "seed_vs_seed"
NULL_COV_MATCHED = "cov_matched_random"
NULL_INIT = "SAE at initialisation"
NULL_NOISE_MATCHED = "isotropic_noise_matched_norm"
NULL_ANALYTIC = "analytic_expectation"
NULL_RANDOM_SUBSPACE = "random_subspace"
NULL_RANDOM_FEATURES = "random_features"  # the same number of random alive adapter-SAE features
NULL_LATER_POSITIONS = "mean_delta_norm_later_positions"
NULL_MEAN_PREDICTOR = "mean_predictor"  # FVU of predicting Δ's mean: 1
NULL_BEST_CONTROL = "best_control"  # the lower-FVU of ref_diff and ref_lstsq_active
NULL_STRONGEST_ALIGNMENT = "strongest_alignment_null"  # max of the isotropic, cov-matched and SAE-at-init nulls
NULL_SELECTED_RANDOM = "selected_random_dictionary"  # the same split-half selection run on random dictionaries
NULL_DOC_PERMUTATION = "document_permutation"  # CKA with the documents of one side re-paired
NULL_MIN_P = "min_attainable_p"  # the smallest p-value a permutation design can reach
NULL_ZERO_SPLICE = "zero_splice"  # splicing Δ̂ = 0 (the adapter still acts after the spliced layer)

# ---- what an interval resampled (the ci_unit column) -----------------------------------------------------------
CI_DOCUMENT = "document"
CI_SEED = "seed"
CI_ATOM = "atom"

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
FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL = "fvu_gap_adapter_sae_vs_best_control"
FVU_SAE_INIT = "fvu_sae_init"  # the adapter SAE's architecture at initialisation, fed Δ
FVU_GAP_ADAPTER_SAE_VS_SAE_INIT = "fvu_gap_adapter_sae_vs_sae_init"
RECON_IMPROVEMENT_PCT = "recon_improvement_pct"  # a labelled extra against the weakest control, never a verdict

# ---- density ---------------------------------------------------------------------------------------------------
L0_ADAPTER_SAE = "l0_adapter_sae"
DEAD_FRACTION_ADAPTER_SAE = "dead_fraction_adapter_sae"
ALIVE_LATENTS_ADAPTER_SAE = "alive_latents_adapter_sae"
MEAN_DENSITY_ADAPTER_SAE = "mean_density_adapter_sae"
L0_REF_ON_DELTA = "l0_ref_on_delta"
L0_REF_ON_BASE = "l0_ref_on_base"
# free-L0 SAEs of the density stage (lorascope.study.density, lorascope.saes.density.density_rows)
L0_FIXED_COEFFICIENT = "l0_fixed_coefficient"
FVU_FIXED_COEFFICIENT = "fvu_fixed_coefficient"
L0_MATCHED_FVU = "l0_matched_fvu"
COEFFICIENT_MATCHED_FVU = "coefficient_matched_fvu"

# ---- decoder similarity ----------------------------------------------------------------------------------------
MMCS_ADAPTER_TO_REF = "mmcs_adapter_to_ref"
MMCS_REF_TO_ADAPTER = "mmcs_ref_to_adapter"
MMCS_SEED_VS_SEED = "mmcs_seed_vs_seed"
MMCS_NULL_ISOTROPIC = "mmcs_null_isotropic"
MMCS_NULL_COV_MATCHED = "mmcs_null_cov_matched"
MMCS_NULL_SAE_INIT = "mmcs_null_sae_init"
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


def selected_cos2(pair: str) -> str:
    """Split-half, selection-aware mean cos² of ``pair`` (atoms selected on one half of the documents, PCA(Δ) of
    the other); its null is the same selection run on random dictionaries."""
    return f"selected_cos2_{pair}"


def selected_cos2_null_q95(pair: str) -> str:
    """95th percentile of :func:`selected_cos2`'s null over random-dictionary draws (the verdict's bar)."""
    return f"selected_cos2_null_q95_{pair}"


SELECTED_PAIRS = (PCA_DELTA_VS_REF_TOPK, PCA_DELTA_VS_ADAPTER_TOPK)


def principal_angles_array(pair: str) -> str:
    """Name of the per-(layer, adapter) array of principal angles of ``pair``."""
    return f"principal_angles_{pair}"


# ---- CKA -------------------------------------------------------------------------------------------------------
CKA_CODES_ADAPTER_VS_REF = "cka_codes_adapter_vs_ref"
CKA_DELTA_VS = "cka_delta_vs_"  # prefix of cka_delta_vs(adapter)
CKA_STATS = ("null_q95", "p", "biased")  # the companions of a debiased CKA row


def cka_delta_vs(adapter: str) -> str:
    """Debiased linear CKA between this row's adapter's Δ and ``adapter``'s Δ on the same tokens."""
    return f"cka_delta_vs_{adapter}"


def cka_extra(name: str, stat: str) -> str:
    """A companion of the CKA row ``name``: ``null_q95`` (95th percentile of the document-permutation null),
    ``p`` (its one-sided p-value) or ``biased`` (the biased estimator, a labelled extra)."""
    if stat not in CKA_STATS:
        raise ValueError(f"unknown CKA companion {stat!r}")
    return f"cka_{stat}__{name}"


# ---- splice ----------------------------------------------------------------------------------------------------
KL_ADAPTED_VS_BASE = "kl_adapted_vs_base"


def kl_recovered(method: str) -> str:
    return f"kl_recovered_{method}"


SPLICE_BASELINES = ("zero", "mean_delta")  # Δ̂ = 0 and Δ̂ = mean Δ over training documents


def kl_recovered_rel(method: str) -> str:
    """1 − KL(adapted ‖ splice_method)/KL(adapted ‖ splice_zero): recovery beyond splicing Δ̂ = 0."""
    return f"kl_recovered_rel_{method}"


def kl_recovered_raw(method: str) -> str:
    """1 − KL(adapted ‖ splice_method)/KL(adapted ‖ base): the old, baseline-blind recovery (a labelled extra)."""
    return f"kl_recovered_raw_{method}"


def kl(method: str) -> str:
    """Mean KL(adapted ‖ splice_method) per selected token (nats)."""
    return f"kl_{method}"


KL_RECOVERED_REL_ADAPTER_SAE = kl_recovered_rel(ADAPTER_SAE)
KL_RECOVERED_REL_REF_DIFF = kl_recovered_rel(REF_DIFF)
KL_RECOVERED_RAW_ADAPTER_SAE = kl_recovered_raw(ADAPTER_SAE)

# ---- trends over rank / depth (one row per layer, or per adapter for depth) -------------------------------------
TREND_DELTA_NORM_RANK = "trend_delta_norm_vs_log2_rank"
TREND_DELTA_NORM_RANK_P = "trend_delta_norm_vs_log2_rank_p"
TREND_L0_RANK = "trend_l0_vs_log2_rank"
TREND_L0_RANK_P = "trend_l0_vs_log2_rank_p"
TREND_DELTA_NORM_DEPTH = "trend_delta_norm_vs_layer"
TREND_DELTA_NORM_DEPTH_P = "trend_delta_norm_vs_layer_p"
TREND_FREE_L0_RANK = "trend_free_l0_vs_log2_rank"
TREND_FREE_L0_RANK_P = "trend_free_l0_vs_log2_rank_p"
TREND_FREE_L0_DEPTH = "trend_free_l0_vs_layer"
TREND_FREE_L0_DEPTH_P = "trend_free_l0_vs_layer_p"

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

# ---- explain: what the adapter changed (study.explain) --------------------------------------------------------
TOP_FEATURE_STABILITY = "top_feature_stability"
TEMPLATE_FLAGGED_FEATURES = "template_flagged_features"
TOP_MODULE_DELTA_SHARE = "top_module_delta_share"
ATTRIBUTION_REMAINDER = "attribution_remainder"
ABLATE_EFFECT_LOST = "ablate_effect_lost_top_features"
ABLATE_BEHAVIOUR_LOST = "ablate_behaviour_lost_top_features"
STEER_KL_BASE = "steer_kl_adapted_vs_base"
INTRUDER_DIMENSIONS = "intruder_dimensions"
INTRUDERS_ALIGNED = "intruders_aligned_features"
LATENTS_STRENGTHENED = "ref_latents_strengthened"
LATENTS_WEAKENED = "ref_latents_weakened"
STEER_EDITS = ("top_features", "random_features", "pca", "sae_reconstruction", "mean_delta", "exact_delta")
MARKER_RUNS = (
    "base",
    "adapted",
    "patch_top_features",
    "patch_random_features",
    "patch_pca",
    "patch_sae_reconstruction",
    "steer_mean_delta",
    "patch_exact_delta",
)


def steer_kl_closed(edit: str) -> str:
    """Fraction of KL(adapted ‖ base) closed by steering the base with ``edit``: ``steer_kl_closed_{edit}``."""
    return f"steer_kl_closed_{edit}"


def steer_behaviour(edit: str) -> str:
    """Share of the adapter's held-out loss gain recovered by steering: ``steer_behaviour_{edit}``."""
    return f"steer_behaviour_{edit}"


def first_position_delta(position: int) -> str:
    """‖mean Δ‖ over documents at one of the first positions: ``first_position_mean_delta_norm_{p}``."""
    return f"first_position_mean_delta_norm_{position}"


def marker_rate(run: str, scale: float = 1.0) -> str:
    """Demo-task pirate-marker rate of greedy answers: ``marker_rate_{run}``, ``marker_rate_{run}_x{scale}`` for a
    steering vector scaled by ``scale`` ≠ 1."""
    return f"marker_rate_{run}" if scale == 1.0 else f"marker_rate_{run}_x{scale:g}"


# ---- the held-out split ----------------------------------------------------------------------------------------
REFERENCE_EVAL_OVERLAP = "reference_eval_overlap_docs"

# ---- the catalogue ---------------------------------------------------------------------------------------------
_FIXED = [
    Metric(
        SPLIT,
        REFERENCE_EVAL_OVERLAP,
        "evaluation (held-out) documents the path reference SAE was trained on; > 0 only when "
        "reference_sae.allow_overlap let it through (the report flags it)",
    ),
    Metric(DELTA_NORM, BASE_NORM_MEAN, "mean ‖h_base,t‖ over held-out tokens"),
    Metric(DELTA_NORM, EFFECTIVE_RANK_PR, "participation ratio (Σλ)²/Σλ² of Δ's covariance"),
    Metric(DELTA_NORM, PCA_K90, "PCA components for 90% of Δ's variance"),
    Metric(RECONSTRUCTION, FVU_REF_ON_BASE, "FVU of the reference SAE on held-out base activations"),
    Metric(
        RECONSTRUCTION,
        FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL,
        "FVU(adapter SAE) − FVU(best control), paired over the same document resamples",
        NULL_BEST_CONTROL,
        CI_DOCUMENT,
    ),
    Metric(
        RECONSTRUCTION,
        FVU_SAE_INIT,
        "FVU on held-out Δ of the adapter SAE's architecture at its "
        "initialisation (a dictionary that learned nothing but encodes Δ itself)",
        NULL_MEAN_PREDICTOR,
        CI_DOCUMENT,
    ),
    Metric(
        RECONSTRUCTION,
        FVU_GAP_ADAPTER_SAE_VS_SAE_INIT,
        "FVU(adapter SAE) − FVU(SAE at initialisation), paired over the same document resamples",
        NULL_INIT,
        CI_DOCUMENT,
    ),
    Metric(
        RECONSTRUCTION,
        RECON_IMPROVEMENT_PCT,
        "100·(FVU_ref_on_delta − FVU_adapter)/FVU_ref_on_delta: extra "
        "against the weakest control (the reference SAE fed Δ); verdicts use the gap to the best control",
    ),
    Metric(DENSITY, L0_ADAPTER_SAE, "active adapter-SAE latents per held-out Δ token", ci=CI_DOCUMENT),
    Metric(DENSITY, DEAD_FRACTION_ADAPTER_SAE, "fraction of adapter-SAE latents never active on held-out Δ"),
    Metric(DENSITY, ALIVE_LATENTS_ADAPTER_SAE, "adapter-SAE latents active at least once on held-out Δ"),
    Metric(DENSITY, MEAN_DENSITY_ADAPTER_SAE, "mean firing rate of the adapter-SAE latents"),
    Metric(DENSITY, L0_REF_ON_DELTA, "active reference-SAE latents per held-out Δ token"),
    Metric(DENSITY, L0_REF_ON_BASE, "active reference-SAE latents per held-out base token"),
    Metric(
        DENSITY,
        L0_FIXED_COEFFICIENT,
        "active latents per held-out Δ token of a free-L0 SAE (paper_a: ReLU + "
        "plain L1 on mean-norm-normalised Δ) trained at the fixed coefficient in the row's note",
        ci=CI_DOCUMENT,
    ),
    Metric(DENSITY, FVU_FIXED_COEFFICIENT, "held-out FVU of that free-L0 SAE at the fixed coefficient"),
    Metric(
        DENSITY,
        L0_MATCHED_FVU,
        "L0 of free-L0 SAEs at the coefficient whose held-out FVU equals the target "
        "(in the note; NaN when the search did not bracket it)",
    ),
    Metric(DENSITY, COEFFICIENT_MATCHED_FVU, "the sparsity coefficient at which held-out FVU reaches the target"),
    Metric(
        DECODER_SIMILARITY,
        MMCS_ADAPTER_TO_REF,
        "mean best cosine of alive adapter atoms to alive reference "
        "atoms (CI over seeds when ≥ 2 seeds, else over atoms)",
        NULL_STRONGEST_ALIGNMENT,
        "seed|atom",
    ),
    Metric(
        DECODER_SIMILARITY,
        MMCS_REF_TO_ADAPTER,
        "mean best cosine of reference atoms to adapter atoms",
        NULL_RANDOM_ISOTROPIC,
        CI_ATOM,
    ),
    Metric(
        DECODER_SIMILARITY,
        MMCS_SEED_VS_SEED,
        "MMCS between two seeds of the adapter SAE over both seeds' alive atoms (the ceiling)",
        NULL_SEED_VS_SEED,
        CI_ATOM,
    ),
    Metric(
        DECODER_SIMILARITY,
        MMCS_NULL_ISOTROPIC,
        "exact expected MMCS to the alive reference atoms of random isotropic atoms",
        NULL_RANDOM_ISOTROPIC,
    ),
    Metric(
        DECODER_SIMILARITY,
        MMCS_NULL_COV_MATCHED,
        "MMCS to the alive reference atoms of random atoms drawn with the covariance of Δ on training documents",
        NULL_COV_MATCHED,
    ),
    Metric(
        DECODER_SIMILARITY,
        MMCS_NULL_SAE_INIT,
        "MMCS to the alive reference atoms of the adapter SAE's decoder at its real initialisation",
        NULL_INIT,
    ),
    Metric(DECODER_SIMILARITY, HUNGARIAN_MEAN_COS, "mean cosine of the one-to-one (Hungarian) matching of alive atoms"),
    Metric(
        CKA,
        CKA_CODES_ADAPTER_VS_REF,
        "debiased linear CKA of adapter-SAE vs reference-SAE codes on Δ (null: mean over document permutations)",
        NULL_DOC_PERMUTATION,
    ),
    Metric(SPLICE, KL_ADAPTED_VS_BASE, "mean KL(p_adapted ‖ p_base) over held-out tokens"),
    Metric(
        DELTA_NORM,
        TREND_DELTA_NORM_RANK,
        "OLS slope of mean ‖Δ‖ on log2 rank across same-recipe adapters (paired document bootstrap)",
        ci=CI_DOCUMENT,
    ),
    Metric(DELTA_NORM, TREND_DELTA_NORM_RANK_P, "exact permutation p-value of that slope (two-sided)", NULL_MIN_P),
    Metric(DENSITY, TREND_L0_RANK, "OLS slope of L0 (alive latents under TopK) on log2 rank", ci=CI_DOCUMENT),
    Metric(
        DENSITY,
        TREND_FREE_L0_RANK,
        "OLS slope of the free-L0 SAE's L0 (fixed coefficient) on log2 rank, per layer",
        ci=CI_DOCUMENT,
    ),
    Metric(DENSITY, TREND_FREE_L0_RANK_P, "exact permutation p-value of that slope (two-sided)", NULL_MIN_P),
    Metric(
        DENSITY,
        TREND_FREE_L0_DEPTH,
        "OLS slope of the free-L0 SAE's L0 (fixed coefficient) on layer index, per adapter",
        ci=CI_DOCUMENT,
    ),
    Metric(DENSITY, TREND_FREE_L0_DEPTH_P, "exact permutation p-value of that slope (two-sided)", NULL_MIN_P),
    Metric(DENSITY, TREND_L0_RANK_P, "exact permutation p-value of that slope (two-sided)", NULL_MIN_P),
    Metric(DELTA_NORM, TREND_DELTA_NORM_DEPTH, "OLS slope of mean ‖Δ‖ on layer index, per adapter", ci=CI_DOCUMENT),
    Metric(DELTA_NORM, TREND_DELTA_NORM_DEPTH_P, "exact permutation p-value of that slope (two-sided)", NULL_MIN_P),
    Metric(LORA, TRAIN_LOSS_START, "LoRA training loss over the first steps"),
    Metric(LORA, TRAIN_LOSS_END, "LoRA training loss over the last steps"),
    Metric(LORA, HELDOUT_LOSS_BASE, "base model's loss on held-out fine-tuning examples"),
    Metric(LORA, HELDOUT_LOSS_ADAPTED, "adapted model's loss on held-out fine-tuning examples"),
    Metric(ABSORPTION, ABSORPTION_FRACTION, "SAEBench absorption fraction (first-letter task)"),
    Metric(ABSORPTION, FULL_ABSORPTION_RATE, "SAEBench full absorption rate"),
    Metric(ABSORPTION, SPLITTING_K, "latents needed to match the probe (feature splitting)"),
    Metric(ABSORPTION, PROBE_LETTERS_PASSING, "letters whose linear probe passes the F1 bar"),
    Metric(
        EXPLAIN,
        TOP_FEATURE_STABILITY,
        "mean seed stability of the top features (fraction of other SAE seeds "
        "with a partner above the random-dictionary threshold)",
    ),
    Metric(
        EXPLAIN,
        TEMPLATE_FLAGGED_FEATURES,
        "alive features with > 50% of activation mass on chat-template scaffolding (flagged, ranked last)",
    ),
    Metric(
        EXPLAIN,
        TOP_MODULE_DELTA_SHARE,
        "largest share of Δ_L energy written directly by one LoRA module (module in the note)",
    ),
    Metric(EXPLAIN, ATTRIBUTION_REMAINDER, "mean |remainder| / |projection| of the top features (indirect effects)"),
    Metric(
        EXPLAIN, ABLATE_EFFECT_LOST, "KL(adapted ‖ adapted − top features) / KL(adapted ‖ base)", NULL_RANDOM_FEATURES
    ),
    Metric(
        EXPLAIN,
        ABLATE_BEHAVIOUR_LOST,
        "share of the adapter's held-out loss gain lost when the top features are ablated",
        NULL_RANDOM_FEATURES,
    ),
    Metric(EXPLAIN, STEER_KL_BASE, "mean KL(adapted ‖ base) on the steering examples' response tokens"),
    Metric(
        EXPLAIN,
        INTRUDER_DIMENSIONS,
        "intruder singular vectors (max |cos| to base < 0.5 among the top 10) in the LoRA modules of block L",
    ),
    Metric(EXPLAIN, INTRUDERS_ALIGNED, "(intruder, feature) pairs whose |cos| beats the random-dictionary threshold"),
    Metric(EXPLAIN, LATENTS_STRENGTHENED, "reference latents with β_base/β_ft < 0.5 (latent scaling)"),
    Metric(EXPLAIN, LATENTS_WEAKENED, "reference latents with β_base/β_ft > 2 (latent scaling)"),
]
METRICS: dict[str, Metric] = {m.name: m for m in _FIXED}

_METHODS = "|".join(RECON_METHODS)
_PAIRS = "|".join(
    (PCA_DELTA_VS_REF_TOPK, PCA_DELTA_VS_ADAPTER_TOPK, ADAPTER_TOPK_VS_REF_TOPK, PCA_DELTA_VS_LORA_COLSPACE)
)
_SELECTED = "|".join(SELECTED_PAIRS)
_SPLICE_METHODS = "|".join((*RECON_METHODS, *SPLICE_BASELINES))
# (pattern, family, description, null, ci unit) for the names built by the functions above
_PATTERNS = [
    (r"(rel_)?delta_norm_mean", DELTA_NORM, "mean ‖Δ_t‖ (or ‖Δ_t‖/‖h_base,t‖) over held-out tokens", "", CI_DOCUMENT),
    (rf"(rel_)?delta_norm_({'|'.join(DELTA_NORM_STATS)})", DELTA_NORM, "‖Δ_t‖ (or ‖Δ_t‖/‖h_base,t‖) summary", "", ""),
    (
        rf"fvu_({_METHODS})",
        RECONSTRUCTION,
        "fraction of Δ's variance unexplained by the method",
        NULL_MEAN_PREDICTOR,
        CI_DOCUMENT,
    ),
    (rf"(mse|cos)_({_METHODS})", RECONSTRUCTION, "mean squared error / cosine of the method's Δ̂", "", ""),
    (
        r"overlap_(adapter_to_ref|ref_to_adapter)@[0-9.]+",
        DECODER_SIMILARITY,
        "fraction of atoms whose best match is ≥ τ",
        NULL_RANDOM_ISOTROPIC,
        "",
    ),
    (
        rf"mean_cos2_{PCA_DELTA_VS_LORA_COLSPACE}",
        SUBSPACE,
        "mean cos² of the principal angles of PCA(Δ) and the "
        "LoRA column space (chosen without looking at Δ: k/d applies)",
        NULL_RANDOM_SUBSPACE,
        "",
    ),
    (
        rf"mean_cos2_({_PAIRS})",
        SUBSPACE,
        "mean cos² of the principal angles of two rank-k subspaces selected on "
        "the same Δ (descriptive: k/d does not apply; see selected_cos2_*)",
        "",
        "",
    ),
    (
        rf"selected_cos2_({_SELECTED})",
        SUBSPACE,
        "split-half selection-aware mean cos² of selected atoms vs PCA(Δ)",
        NULL_SELECTED_RANDOM,
        "",
    ),
    (
        rf"selected_cos2_null_q95_({_SELECTED})",
        SUBSPACE,
        "95th percentile of the selected-random-dictionary null",
        "",
        "",
    ),
    (rf"(largest|smallest)_angle_deg_({_PAIRS})", SUBSPACE, "largest / smallest principal angle (degrees)", "", ""),
    (r"cka_delta_vs_.+", CKA, "debiased linear CKA of Δ across adapters on the same tokens", NULL_DOC_PERMUTATION, ""),
    (
        rf"cka_({'|'.join(CKA_STATS)})__.+",
        CKA,
        "companion of a CKA row: null 95th percentile, p-value or biased estimate",
        "",
        "",
    ),
    (
        rf"kl_recovered_rel_({_SPLICE_METHODS})",
        SPLICE,
        "1 − KL(adapted ‖ spliced)/KL(adapted ‖ spliced with Δ̂ = 0)",
        NULL_ZERO_SPLICE,
        CI_DOCUMENT,
    ),
    (
        rf"kl_recovered_raw_({_SPLICE_METHODS})",
        SPLICE,
        "1 − KL(adapted ‖ spliced)/KL(adapted ‖ base) (ignores that the adapter stays active after the spliced layer)",
        "",
        "",
    ),
    (rf"kl_({_SPLICE_METHODS})", SPLICE, "mean KL(adapted ‖ spliced) per selected token", "", ""),
    (
        r"steer_kl_closed_top_features",
        EXPLAIN,
        "1 − KL(adapted ‖ steered base)/KL(adapted ‖ base), top features",
        NULL_RANDOM_FEATURES,
        "",
    ),
    (
        r"steer_behaviour_top_features",
        EXPLAIN,
        "held-out loss gain recovered by steering with the top features",
        NULL_RANDOM_FEATURES,
        "",
    ),
    (
        rf"steer_(kl_closed|behaviour)_({'|'.join(STEER_EDITS[1:])})",
        EXPLAIN,
        "KL closed / loss gain recovered by a control edit",
        "",
        "",
    ),
    (
        r"first_position_mean_delta_norm_[0-9]+",
        EXPLAIN,
        "‖mean Δ‖ across documents at one of the first positions (first-positions bias control)",
        NULL_LATER_POSITIONS,
        "",
    ),
    (
        r"marker_rate_patch_top_features(_x[0-9.e+-]+)?",
        EXPLAIN,
        "pirate-marker rate of the base patched with the top features (their activations on Δ, token by token)",
        NULL_RANDOM_FEATURES,
        "",
    ),
    (
        rf"marker_rate_(base|adapted|({'|'.join(r for r in MARKER_RUNS[3:])})(_x[0-9.e+-]+)?)",
        EXPLAIN,
        "pirate-marker rate of greedy answers",
        "",
        "",
    ),
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
_CHECKPOINT_METRIC = Metric(
    CHECKPOINT, CHECKPOINT_STEP, "training step of this checkpoint (value; its sequence's name in note)"
)
_FIXED.append(_CHECKPOINT_METRIC)
METRICS[CHECKPOINT_STEP] = _CHECKPOINT_METRIC
