"""Findings: verdict rules on constructed tables (each claim against its strongest control) and the numbers."""

from __future__ import annotations

import math

from lorascope import results_schema as schema
from lorascope.report import compute_findings, findings_markdown, load_run
from lorascope.report.findings import HOLDS, MIXED, NOT_HOLDS, NOT_MEASURED, NOT_TESTABLE
from lorascope.results import ResultRow, rows_to_frame

NAN = math.nan


def _row(metric, layer, rank, value, lo=NAN, hi=NAN, null=NAN, family="x", adapter=None):
    return ResultRow(
        family,
        metric,
        value,
        layer=layer,
        adapter=f"rank_{rank}" if adapter is None else adapter,
        rank=rank,
        ci_low=lo,
        ci_high=hi,
        null_value=null,
    )


def _find(rows, key):
    return {f.key: f for f in compute_findings(rows_to_frame(rows))}[key]


CELLS = [(3, 4), (3, 16), (6, 4), (6, 16)]


def _recon(fvu, gap):
    """fvu/gap: {(layer, rank): (value, lo, hi)}."""
    rows = []
    for c, v in fvu.items():
        rows.append(_row(schema.FVU_ADAPTER_SAE, *c, *v, null=1.0))
        rows.append(_row(schema.FVU_GAP_ADAPTER_SAE_VS_BEST_CONTROL, *c, *gap[c], null=0.0))
    return rows


def test_reconstruction_is_read_against_the_best_control_and_the_mean_predictor():
    good = {c: (0.08, 0.07, 0.09) for c in CELLS}
    below = {c: (-0.2, -0.25, -0.15) for c in CELLS}
    f = _find(_recon(good, below), "reconstruction")
    assert f.verdict == HOLDS and f.numbers["cells_holding"] == 4
    assert "0.08 [0.07, 0.09]" in f.text and "-0.2 [-0.25, -0.15]" in f.text and "layer 6, rank 16" in f.text
    # the gap's CI touches 0: not better than the best control, whatever the weakest control says
    touching = {c: (-0.05, -0.1, 0.01) for c in CELLS}
    assert _find(_recon(good, touching), "reconstruction").verdict == NOT_HOLDS
    # better than the controls but no better than predicting the mean (FVU CI reaches 1)
    bad = {c: (0.95, 0.9, 1.02) for c in CELLS}
    assert _find(_recon(bad, below), "reconstruction").verdict == NOT_HOLDS
    mixed = dict(touching)
    mixed[(3, 4)] = below[(3, 4)]
    assert _find(_recon(good, mixed), "reconstruction").verdict == MIXED
    # no interval (bootstrap off): not testable, never "holds"
    nan = {c: (0.08, NAN, NAN) for c in CELLS}
    assert _find(_recon(nan, {c: (-0.2, NAN, NAN) for c in CELLS}), "reconstruction").verdict == NOT_TESTABLE
    assert _find([], "reconstruction").verdict == NOT_MEASURED


def test_alignment_reads_the_strongest_null_and_the_ceiling():
    def f(value, lo, hi, null, ceil=None):
        rows = [_row(schema.MMCS_ADAPTER_TO_REF, 15, 16, value, lo, hi, null=null)]
        if ceil is not None:
            rows.append(_row(schema.MMCS_SEED_VS_SEED, 15, 16, *ceil))
        return _find(rows, "alignment")

    weak = f(0.31, 0.30, 0.32, 0.07, (0.85, 0.8, 0.9))
    assert weak.verdict == "weak" and "0.31 [0.3, 0.32]" in weak.text and "strongest null 0.07" in weak.text
    assert f(0.31, 0.06, 0.32, 0.07, (0.85, 0.8, 0.9)).verdict == "no alignment"  # CI reaches the null
    assert f(0.06, 0.05, 0.07, 0.07).verdict == "no alignment"  # at or below the null is never "weak"
    assert f(0.82, 0.79, 0.84, 0.07, (0.85, 0.8, 0.9)).verdict == "at ceiling"
    assert f(0.31, 0.30, 0.32, 0.07).verdict == "weak"  # no second seed: no ceiling to reach
    assert f(0.31, NAN, NAN, 0.07).verdict == NOT_TESTABLE
    assert _find([], "alignment").verdict == NOT_MEASURED


def _trend(metric, p_metric, slope, lo, hi, p, min_p, layer=3):
    return [_row(metric, layer, -1, slope, lo, hi, adapter=""), _row(p_metric, layer, -1, p, null=min_p, adapter="")]


def test_rank_trends_are_slopes_and_four_ranks_are_not_testable():
    m, pm = schema.TREND_DELTA_NORM_RANK, schema.TREND_DELTA_NORM_RANK_P
    four = _find(_trend(m, pm, 0.3, 0.2, 0.4, 1 / 12, 1 / 12), "delta_norm_rank")
    assert four.verdict == NOT_TESTABLE  # a perfect rise over 4 ranks still has p = 1/12
    six = _find(_trend(m, pm, 0.3, 0.2, 0.4, 2 / 720, 2 / 720), "delta_norm_rank")
    assert six.verdict == HOLDS
    assert _find(_trend(m, pm, 0.3, -0.1, 0.4, 2 / 720, 2 / 720), "delta_norm_rank").verdict == NOT_HOLDS
    assert _find(_trend(m, pm, -0.3, -0.4, -0.2, 2 / 720, 2 / 720), "delta_norm_rank").verdict == NOT_HOLDS
    assert _find([], "delta_norm_rank").verdict == NOT_MEASURED
    depth = [
        _row(schema.TREND_DELTA_NORM_DEPTH, -1, 4, 0.3, 0.2, 0.4),
        _row(schema.TREND_DELTA_NORM_DEPTH_P, -1, 4, 1 / 3, null=1 / 3),
    ]
    assert _find(depth, "delta_norm_depth").verdict == NOT_TESTABLE  # 3 layers


def test_density_is_not_testable_when_topk_fixes_l0():
    rows = [_row(schema.L0_ADAPTER_SAE, 3, r, 16.0) for r in (4, 8, 16, 32)]
    rows += _trend(schema.TREND_L0_RANK, schema.TREND_L0_RANK_P, 0.0, 0.0, 0.0, 1.0, 1 / 12)
    f = _find(rows, "density_rank")
    assert f.verdict == NOT_TESTABLE and f.text.startswith("L0 is fixed at 16")


def test_density_findings_carry_the_matched_reconstruction_reading():
    """Free-L0 rows at a fixed coefficient plus L0 at matched FVU: both density findings quote the matched points
    (per rank at the deepest layer; per layer at the highest rank) and the spread of the fixed-coefficient FVU."""
    rows = []
    for layer in (4, 20):
        for r in (4, 32):
            rows.append(_row(schema.L0_FIXED_COEFFICIENT, layer, r, 2.0, 1.8, 2.2))
            rows.append(_row(schema.FVU_FIXED_COEFFICIENT, layer, r, 0.1 if layer == 4 else 0.8))
            matched = _row(schema.L0_MATCHED_FVU, layer, r, layer + r / 4)
            rows.append(ResultRow(**{**matched.as_record(), "note": f"target FVU 0.2; {r // 4 + 1} runs"}))
    rows += _trend(schema.TREND_FREE_L0_RANK, schema.TREND_FREE_L0_RANK_P, 0.0, -0.1, 0.1, 0.5, 1 / 12, layer=20)
    rows += [
        _row(schema.TREND_FREE_L0_DEPTH, -1, 32, 0.0, -0.1, 0.1),
        _row(schema.TREND_FREE_L0_DEPTH_P, -1, 32, 0.5, null=1 / 12),
    ]
    rank, depth = _find(rows, "density_rank"), _find(rows, "density_depth")
    tail = "The fixed-coefficient SAEs reach held-out FVU 0.1–0.8 across cells"
    assert (
        "(target FVU 0.2; one coefficient search per cell, no interval): L0 21 (rank 4), 28 (rank 32) at layer 20"
        in rank.text
    )
    assert "L0 12 (layer 4), 28 (layer 20) at rank 32" in depth.text
    assert tail in rank.text and tail in depth.text
    assert rank.verdict == depth.verdict == NOT_TESTABLE  # descriptive: the matched reading has no interval


def test_splice_is_relative_to_the_zero_splice_and_the_mean_baseline():
    rel, mean = schema.KL_RECOVERED_REL_ADAPTER_SAE, schema.kl_recovered_rel("mean_delta")
    rows = [
        _row(rel, 3, 4, 0.9, 0.88, 0.92),
        _row(mean, 3, 4, 0.4, 0.38, 0.42),
        _row(rel, 3, 16, 0.5, 0.3, 0.7),
        _row(mean, 3, 16, 0.45, 0.4, 0.5),
        _row(schema.kl_recovered_raw("zero"), 3, 16, 0.8),
    ]
    s = _find(rows, "splice")
    assert s.verdict == MIXED and s.numbers["cells_holding"] == 1
    assert "Δ̂ = 0 alone recovers 0.8" in s.text
    below_zero = [_row(rel, 3, 4, 0.1, -0.05, 0.2)]
    assert _find(below_zero, "splice").verdict == NOT_HOLDS


def test_subspace_uses_the_selection_aware_null_and_only_the_reference():
    pair = schema.PCA_DELTA_VS_REF_TOPK
    rows = [
        _row(schema.selected_cos2(pair), 3, 4, 0.4, null=0.3),
        _row(schema.selected_cos2_null_q95(pair), 3, 4, 0.35),
        _row(schema.selected_cos2(pair), 3, 16, 0.33, null=0.3),
        _row(schema.selected_cos2_null_q95(pair), 3, 16, 0.35),
    ]
    assert _find(rows, "subspace").verdict == MIXED
    assert _find(rows[:2], "subspace").verdict == HOLDS
    # comparisons without the reference never enter the finding
    other = [
        _row(schema.selected_cos2(schema.PCA_DELTA_VS_ADAPTER_TOPK), 3, 4, 0.9, null=0.1),
        _row(schema.mean_cos2(schema.PCA_DELTA_VS_LORA_COLSPACE), 3, 4, 0.9, null=0.01),
    ]
    assert _find(other, "subspace").verdict == NOT_MEASURED
    er = [_row("pca_k90", 3, 4, 9.0), _row("pca_k90", 3, 16, 12.0)]
    f = _find(er, "effective_rank")
    assert f.verdict == MIXED and f.numbers["cells_passing"] == 1


def test_cka_uses_the_permutation_p_value():
    def rows(p):
        m = schema.cka_delta_vs("rank_16")
        return [_row(m, 3, 4, 0.3, null=0.01), _row(schema.cka_extra(m, "p"), 3, 4, p)]

    assert _find(rows(0.02), "cka").verdict == HOLDS
    assert _find(rows(0.4), "cka").verdict == NOT_HOLDS  # a large CKA that chance reaches is not shared


def test_fake_run_findings_and_markdown(reported_run):
    run, _, _ = reported_run
    df = load_run(run).df
    findings = {f.key: f for f in compute_findings(df)}
    assert findings["reconstruction"].verdict == HOLDS and findings["subspace"].verdict == HOLDS
    assert findings["alignment"].verdict == "weak" and findings["cka"].verdict == HOLDS
    assert findings["delta_norm_rank"].verdict == NOT_MEASURED  # the fake run has no trend rows
    md = findings_markdown(df)
    for f in findings.values():
        assert f.title in md and f.rule in md
    assert "ci_unit" in md
