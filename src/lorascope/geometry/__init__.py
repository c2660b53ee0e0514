"""Pure math on tensors: dictionary comparison, subspaces, CKA, reconstruction metrics, nulls, bootstrap.

Never imports transformers, PEFT or the activation store. Every public function accepts numpy arrays and torch
tensors.
"""

from lorascope.geometry.bootstrap import (
    CI,
    UnitCI,
    bootstrap_ci,
    bootstrap_fvu_ci,
    bootstrap_ratio_ci,
    document_bootstrap_fvu_ci,
    document_bootstrap_mean_ci,
    document_bootstrap_ratio_ci,
    fvu_bootstrap_samples,
    unit_bootstrap_ci,
)
from lorascope.geometry.cka import (
    StreamingLinearCKA,
    cka_from_grams,
    gram_linear,
    gram_rbf,
    linear_cka,
    rbf_cka,
)
from lorascope.geometry.compare import compare_dictionaries, seed_vs_seed
from lorascope.geometry.cosine import (
    MMCS,
    BestMatch,
    best_match_both,
    best_match_cosines,
    mmcs,
    overlap,
    unit_rows,
)
from lorascope.geometry.density import (
    DeltaNormStats,
    StreamingCovariance,
    density_histogram,
    mean_active_features,
    n_components_for_variance,
    participation_ratio,
    spectrum_rows,
)
from lorascope.geometry.matching import hungarian_match, matched_cosine_mean
from lorascope.geometry.metrics import (
    ReconstructionStats,
    cosine_similarity_rows,
    feature_density,
    fvu,
    l0,
    mse,
)
from lorascope.geometry.nulls import (
    covariance_matched_dictionary,
    mmcs_null_empirical,
    mmcs_null_isotropic,
    overlap_null_isotropic,
    random_isotropic_dictionary,
)
from lorascope.geometry.reconstruction import DeltaReconstruction, delta_reconstruction, lstsq_on_active_atoms
from lorascope.geometry.subspaces import (
    atom_energy,
    compare_subspaces,
    lora_column_space,
    orthonormal_rows,
    pca_basis,
    principal_angles,
    random_subspace_null,
    subspace_summary,
    top_k_atoms,
)

__all__ = [
    "CI",
    "MMCS",
    "BestMatch",
    "DeltaNormStats",
    "DeltaReconstruction",
    "ReconstructionStats",
    "StreamingCovariance",
    "StreamingLinearCKA",
    "UnitCI",
    "atom_energy",
    "best_match_both",
    "best_match_cosines",
    "bootstrap_ci",
    "bootstrap_fvu_ci",
    "bootstrap_ratio_ci",
    "cka_from_grams",
    "compare_dictionaries",
    "compare_subspaces",
    "cosine_similarity_rows",
    "covariance_matched_dictionary",
    "delta_reconstruction",
    "document_bootstrap_fvu_ci",
    "document_bootstrap_mean_ci",
    "document_bootstrap_ratio_ci",
    "density_histogram",
    "feature_density",
    "fvu",
    "fvu_bootstrap_samples",
    "gram_linear",
    "gram_rbf",
    "hungarian_match",
    "l0",
    "linear_cka",
    "lora_column_space",
    "lstsq_on_active_atoms",
    "matched_cosine_mean",
    "mean_active_features",
    "mmcs",
    "mmcs_null_empirical",
    "mmcs_null_isotropic",
    "mse",
    "n_components_for_variance",
    "orthonormal_rows",
    "overlap",
    "overlap_null_isotropic",
    "participation_ratio",
    "pca_basis",
    "principal_angles",
    "random_isotropic_dictionary",
    "random_subspace_null",
    "rbf_cka",
    "seed_vs_seed",
    "spectrum_rows",
    "subspace_summary",
    "top_k_atoms",
    "unit_bootstrap_ci",
    "unit_rows",
]
