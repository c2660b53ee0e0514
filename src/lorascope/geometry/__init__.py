"""Pure math on tensors: dictionary comparison, subspaces, CKA, reconstruction metrics, nulls, bootstrap.

Never imports transformers, PEFT or the activation store.
"""

from lorascope.geometry.metrics import (
    ReconstructionStats,
    cosine_similarity_rows,
    feature_density,
    fvu,
    l0,
    mse,
)

__all__ = ["ReconstructionStats", "cosine_similarity_rows", "feature_density", "fvu", "l0", "mse"]
