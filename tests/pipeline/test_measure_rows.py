"""Rows the measure stage builds from splice results and per-document trend data (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

from lorascope import results_schema as schema
from lorascope.study.measure import splice_rows
from lorascope.study.splice import SpliceResult
from lorascope.study.trends import per_document, trend_rows


def _result(doc_kl: dict[str, list[float]], tokens: list[int]) -> SpliceResult:
    from lorascope.study.splice import _result

    return _result(doc_kl, tokens)


def test_splice_rows_are_relative_to_the_zero_splice_with_a_document_interval():
    zero = [1.0, 2.0, 3.0, 4.0, 2.0]
    res = _result(
        {
            "base": [2 * z for z in zero],
            "zero": zero,
            "adapter_sae": [0.1 * z for z in zero],
            "mean_delta": [0.5, 1.5, 1.0, 3.0, 1.0],
        },
        [5, 5, 5, 5, 5],
    )
    rows = {r.metric: r for r in splice_rows(res, n_boot=200, seed=0, layer=3, adapter="a", rank=4)}
    rel = rows[schema.kl_recovered_rel("adapter_sae")]
    assert rel.value == pytest.approx(0.9) and rel.ci_unit == "document"
    assert rel.ci_low == pytest.approx(0.9) and rel.ci_high == pytest.approx(0.9)  # every document recovers 90%
    assert rows[schema.kl_recovered_rel("zero")].value == 0.0
    assert rows[schema.kl_recovered_raw("zero")].value == pytest.approx(0.5)  # Δ̂ = 0 already "recovers" half
    assert rows[schema.kl_recovered_raw("adapter_sae")].value == pytest.approx(0.95)
    mean = rows[schema.kl_recovered_rel("mean_delta")]
    assert mean.ci_low <= mean.value <= mean.ci_high and mean.ci_low < mean.ci_high  # bounds swapped correctly
    assert rows[schema.kl("adapter_sae")].value == pytest.approx(0.1 * sum(zero) / 25)
    for name in rows:
        assert schema.lookup(name) is not None, name


def _points(values_per_point: list[float], n_docs: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = torch.arange(n_docs).repeat_interleave(5)
    return [
        per_document(v + 0.01 * torch.randn(docs.numel(), generator=g, dtype=torch.float64), docs)
        for v in values_per_point
    ]


def test_trend_rows_four_ranks_are_not_testable_six_points_can_hold():
    four = trend_rows([1, 2, 3, 4], _points([1.0, 2.0, 3.0, 4.0]), "m", "p", n_boot=200, seed=0, family="f")
    assert "not testable here" in four[0].note and four[1].null_value == pytest.approx(1 / 12)
    six = trend_rows(
        [1, 2, 3, 4, 5, 6], _points([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), "m", "p", n_boot=200, seed=0, family="f"
    )
    assert six[0].value == pytest.approx(1.0, abs=0.01) and six[0].ci_low > 0 and "holds" in six[0].note
    assert six[1].value <= 2 / 720 + 1e-12
    two = trend_rows([1, 2], _points([1.0, 3.0]), "m", "p", n_boot=200, seed=0, family="f")
    assert two[0].value == pytest.approx(2.0, abs=0.02) and math.isfinite(two[0].ci_low)
    other_docs = [_points([1.0])[0], _points([2.0], n_docs=10)[0]]
    assert trend_rows([1, 2], other_docs, "m", "p", n_boot=200, seed=0, family="f") == []  # not paired: no rows
