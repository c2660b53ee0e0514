"""Debiased CKA at the pipeline's shapes and the document-permutation null."""

import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry.cka import balanced_design, cka_from_grams, cka_permutation_null, linear_cka


def _topk_codes(n: int, g: torch.Generator, width: int = 2304, k: int = 16) -> torch.Tensor:
    pre = torch.randn(n, width, generator=g, dtype=torch.float64)
    v, i = pre.topk(k, dim=1)
    return torch.zeros(n, width, dtype=torch.float64).scatter_(1, i, v.relu())


def _sparse_gram(C: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(C.to_sparse(), C.T.contiguous())


def test_independent_topk_codes_debiased_is_zero_biased_is_not():
    g = torch.Generator().manual_seed(0)
    X, Y = _topk_codes(1408, g), _topk_codes(1408, g)
    K, L = _sparse_gram(X), _sparse_gram(Y)
    assert abs(cka_from_grams(K, L, debiased=True)) < 0.05
    assert cka_from_grams(K, L, debiased=False) > 0.3  # measured ~0.6 at this shape
    assert cka_from_grams(K, K, debiased=True) == pytest.approx(1.0, abs=1e-12)


def test_independent_gaussians_at_pipeline_shape():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2816, 576, generator=g, dtype=torch.float64)
    Y = torch.randn(2816, 576, generator=g, dtype=torch.float64)
    assert abs(linear_cka(X, Y, debiased=True)) < 0.05
    assert linear_cka(X, Y) > 0.1  # measured 0.17
    assert linear_cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)


def _documents(g: torch.Generator, n_docs: int = 24) -> torch.Tensor:
    lengths = torch.randint(15, 30, (n_docs,), generator=g)
    return torch.repeat_interleave(torch.arange(n_docs), lengths)


def test_permutation_null_related_vs_unrelated():
    g = torch.Generator().manual_seed(2)
    doc = _documents(g)
    n = doc.numel()
    doc_effect = torch.randn(24, 32, generator=g, dtype=torch.float64)[doc]  # within-document correlation
    X = doc_effect + torch.randn(n, 32, generator=g, dtype=torch.float64)
    Y_related = X @ torch.randn(32, 20, generator=g, dtype=torch.float64) + torch.randn(
        n, 20, generator=g, dtype=torch.float64
    )
    Y_unrelated = torch.randn(24, 20, generator=g, dtype=torch.float64)[doc] + torch.randn(
        n, 20, generator=g, dtype=torch.float64
    )
    rel = cka_permutation_null(X, Y_related, doc, n_perm=49, seed=0)
    unrel = cka_permutation_null(X, Y_unrelated, doc, n_perm=49, seed=0)
    assert rel.p_value == pytest.approx(0.02) and rel.tested_value > rel.null_q95
    assert unrel.p_value > 0.05 and unrel.tested_value < unrel.null_q95
    # unrelated contents, but both sides encode "which document": debiased CKA ~0.2, not 0 -- the permutation
    # null (which keeps document membership on both sides) is what the value must be read against
    assert unrel.null_mean > 0.1 and unrel.tested_value > 0.1
    assert unrel.null_q95 > unrel.null_mean and rel.debiased and rel.n_perm == 49
    assert unrel.value == pytest.approx(linear_cka(X, Y_unrelated, debiased=True), abs=1e-10)
    assert rel.n_docs >= 18 and rel.doc_length >= 15


def test_balanced_design_cuts_documents_to_one_length():
    docs = [torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5, 6, 7, 8])]
    design, m = balanced_design(docs)
    assert m == 2 and design.tolist() == [[0, 1], [3, 4], [5, 6]]  # lower quartile of (3, 2, 4)
    design, m = balanced_design(docs, doc_length=3)
    assert design.tolist() == [[0, 1, 2], [5, 6, 7]]


def test_permutation_p_values_are_calibrated_on_unrelated_documents():
    p = []
    for s in range(30):
        g = torch.Generator().manual_seed(100 + s)
        doc = _documents(g, n_docs=12)
        n = doc.numel()
        X = torch.randn(12, 8, generator=g, dtype=torch.float64)[doc] + torch.randn(
            n, 8, generator=g, dtype=torch.float64
        )
        Y = torch.randn(12, 6, generator=g, dtype=torch.float64)[doc] + torch.randn(
            n, 6, generator=g, dtype=torch.float64
        )
        p.append(cka_permutation_null(X, Y, doc, n_perm=19, seed=s).p_value)
    assert sum(v <= 0.05 for v in p) <= 4  # expected 1.5 of 30 at level 0.05 (P(X > 4) < 0.02 if calibrated)
    assert 0.35 < sum(p) / len(p) < 0.65


def test_permutation_null_bad_inputs():
    X = torch.randn(10, 3)
    with pytest.raises(LorascopeError, match="one document id per row"):
        cka_permutation_null(X, X, [0] * 9)
    with pytest.raises(LorascopeError, match=">= 3 documents"):
        cka_permutation_null(X, X, [0] * 5 + [1] * 5)


def test_streaming_debiased_matches_the_n_by_n_u_centred_gram():
    from lorascope.geometry.cka import StreamingLinearCKA, gram_linear

    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 24) + 50.0
    Y = (
        X[:, :10] @ torch.randn(10, 16, generator=g, dtype=torch.float64)
        + 3 * torch.randn(300, 16, generator=g, dtype=torch.float64)
        - 20.0
    )
    acc = StreamingLinearCKA()
    for i in range(0, 300, 41):
        acc.update(X[i : i + 41], Y[i : i + 41])
    gram = cka_from_grams(gram_linear(X), gram_linear(Y), debiased=True)
    assert acc.value(debiased=True) == pytest.approx(gram, abs=1e-9)
    assert abs(acc.value(debiased=True) - acc.value(debiased=False)) > 1e-3  # the two estimators differ here
