"""Document-level (cluster) bootstrap: coverage on correlated documents, where the token bootstrap fails."""

import numpy as np
import pytest
import torch

from lorascope.errors import LorascopeError
from lorascope.geometry import fvu
from lorascope.geometry.bootstrap import (
    bootstrap_ci,
    document_bootstrap_fvu_ci,
    document_bootstrap_mean_ci,
    document_bootstrap_ratio_ci,
    document_sums,
    fvu_bootstrap_samples,
    resample_counts,
    unit_bootstrap_ci,
)

TRUE_MEAN = 0.3


def _correlated_documents(rng: np.random.Generator, n_docs: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """~40 documents of 20-40 tokens; token = mean + document effect (sd 1) + token noise (sd 1)."""
    lengths = rng.integers(20, 41, size=n_docs)
    doc = np.repeat(np.arange(n_docs), lengths)
    values = TRUE_MEAN + rng.normal(size=n_docs)[doc] + rng.normal(size=doc.size)
    return values, doc


def _coverage(ci_fn, reps: int = 100) -> float:
    rng = np.random.default_rng(0)
    hits = 0
    for r in range(reps):
        v, doc = _correlated_documents(rng)
        ci = ci_fn(v, doc, r)
        hits += ci.low <= TRUE_MEAN <= ci.high
    return hits / reps


def test_document_bootstrap_covers_and_token_bootstrap_does_not():
    doc_cov = _coverage(lambda v, doc, r: document_bootstrap_mean_ci(v, doc, n_boot=200, seed=r))
    tok_cov = _coverage(lambda v, doc, r: bootstrap_ci(v, n_boot=200, seed=r))
    assert doc_cov >= 0.90
    assert tok_cov < 0.5  # tokens treated as independent: intervals ~4x too narrow
    assert doc_cov - tok_cov > 0.4


def test_document_ci_is_wider_and_labelled():
    v, doc = _correlated_documents(np.random.default_rng(3))
    d = document_bootstrap_mean_ci(v, doc, n_boot=500, seed=0)
    t = bootstrap_ci(v, n_boot=500, seed=0)
    assert d.ci_unit == "document" and d.n_units == 40
    assert d.value == pytest.approx(v.mean(), rel=1e-12)
    assert (d.high - d.low) > 3 * (t.high - t.low)
    assert document_bootstrap_mean_ci(v, doc, n_boot=500, seed=0) == d  # deterministic


def test_string_ids_and_tensor_ids_agree():
    v, doc = _correlated_documents(np.random.default_rng(4), n_docs=10)
    a = document_bootstrap_mean_ci(v, torch.from_numpy(doc), n_boot=100, seed=1)
    b = document_bootstrap_mean_ci(v, [f"doc{i:03d}" for i in doc], n_boot=100, seed=1)
    assert a == b  # same dense order: sorted tensor ids == first-appearance order of sorted strings


def test_ratio_resamples_numerator_and_denominator_together():
    num = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0])
    den = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    doc = [0, 0, 1, 1, 1]
    ci = document_bootstrap_ratio_ci(num, den, doc, n_boot=2000, seed=0)
    assert ci.value == pytest.approx(8 / 5)
    # only three resamples exist: {0,0} -> 1, {1,1} -> 2, {0,1} -> 8/5
    assert ci.low == pytest.approx(1.0) and ci.high == pytest.approx(2.0)


def test_document_fvu_recentres_on_each_resample():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64) + 10
    xh = x + 0.5 * torch.randn(60, 3, generator=g, dtype=torch.float64)
    doc = torch.arange(60) // 6
    err = ((x - xh) ** 2).sum(1)
    point, samples, u = fvu_bootstrap_samples(torch.stack([err, 2 * err], 1), x, doc, n_boot=1, seed=7)
    assert u == 10 and point[0] == pytest.approx(fvu(x, xh), rel=1e-12) and point[1] == pytest.approx(2 * point[0])
    w = resample_counts(10, 1, seed=7)[0].long()
    idx = torch.cat([torch.arange(6 * i, 6 * i + 6).repeat(int(w[i])) for i in range(10)])
    assert float(samples[0, 0]) == pytest.approx(fvu(x[idx], xh[idx]), rel=1e-10)
    (ci,) = document_bootstrap_fvu_ci(err, x, doc, n_boot=200)
    assert ci.ci_unit == "document" and ci.low <= ci.value <= ci.high


def test_unit_bootstrap_labels_and_degenerate_cases():
    ci = unit_bootstrap_ci([0.4, 0.5, 0.6, 0.45], "seed", n_boot=500)
    assert ci.ci_unit == "seed" and ci.n_units == 4 and 0.4 <= ci.low < ci.value < ci.high <= 0.6
    one = unit_bootstrap_ci([0.5], "seed")
    assert one.value == 0.5 and np.isnan(one.low)
    with pytest.raises(LorascopeError, match="ci_unit"):
        unit_bootstrap_ci([1.0, 2.0], "tokens")


def test_mismatched_lengths_raise():
    with pytest.raises(LorascopeError, match="one document id per token"):
        document_sums(torch.ones(5), [0, 1])
