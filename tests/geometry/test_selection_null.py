"""Selection-aware subspace overlap: a random dictionary scores at its null, a planted one far above."""

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry.nulls import random_isotropic_dictionary
from lorascope.geometry.subspaces import (
    pca_basis,
    projection_energy,
    selection_aware_overlap,
    split_documents,
    subspace_summary,
    top_k_atoms,
)

D_MODEL, K = 64, 4


def _delta_world(seed: int = 0, n_docs: int = 40, per_doc: int = 30):
    """Δ with K strong directions (variances 16, 12, 9, 6) plus an anisotropic bulk, in documents."""
    g = torch.Generator().manual_seed(seed)
    true_dirs = torch.linalg.qr(torch.randn(D_MODEL, K, generator=g, dtype=torch.float64))[0].T  # [K, d]
    n = n_docs * per_doc
    z = torch.randn(n, K, generator=g, dtype=torch.float64) * torch.tensor([4.0, 3.5, 3.0, 2.5])
    bulk = torch.randn(n, D_MODEL, generator=g, dtype=torch.float64) * torch.linspace(0.3, 1.2, D_MODEL)
    doc_shift = torch.randn(n_docs, D_MODEL, generator=g, dtype=torch.float64)[torch.arange(n) // per_doc]
    return z @ true_dirs + bulk + 0.5 * doc_shift, torch.arange(n) // per_doc, true_dirs


def test_naive_comparison_is_inflated_for_a_random_dictionary():
    delta, _, _ = _delta_world()
    W = random_isotropic_dictionary(512, D_MODEL, seed=5, dtype=torch.float64)
    naive = subspace_summary(top_k_atoms(W, projection_energy(W, delta), K), pca_basis(delta, K))["mean_cos2"]
    assert naive > 2.5 * K / D_MODEL  # selection on the same Δ: far above k/d


def test_random_dictionary_scores_at_its_null_planted_far_above():
    delta, doc, true_dirs = _delta_world()
    W_rand = random_isotropic_dictionary(512, D_MODEL, seed=5, dtype=torch.float64)
    rand = selection_aware_overlap(W_rand, delta, doc, K, n_draws=20, seed=1)
    assert rand.naive_null == pytest.approx(K / D_MODEL)
    assert rand.isotropic_mean > 2 * rand.naive_null  # the selection effect survives the split: it is the null
    assert rand.value <= rand.null_q95  # a random dictionary is not "beyond chance"
    assert abs(rand.value - rand.isotropic_mean) < 0.1
    W_planted = torch.cat([W_rand[:500], true_dirs])
    planted = selection_aware_overlap(W_planted, delta, doc, K, n_draws=20, seed=1)
    assert planted.value > 0.8 and planted.value > planted.null_q95 + 0.3
    assert planted.null == max(planted.isotropic_mean, planted.cov_matched_mean)


def test_split_documents_keeps_documents_whole():
    doc = torch.arange(100) // 10
    sel = split_documents(doc, seed=3)
    assert int(sel.sum()) == 50
    for i in range(10):
        assert sel[doc == i].all() or not sel[doc == i].any()
    with pytest.raises(LorascopeError, match="at least 2 documents"):
        split_documents(torch.zeros(5, dtype=torch.int64))
