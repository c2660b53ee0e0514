"""Findings: verdict rules on constructed tables (holds / does not hold / mixed / not measured) and the numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lorascope.report import compute_findings, findings_markdown, load_run
from lorascope.report.findings import HOLDS, MIXED, NOT_HOLDS, NOT_MEASURED
from lorascope.results import ResultRow, rows_to_frame

NAN = math.nan


def _row(metric, layer, rank, value, lo=NAN, hi=NAN, null=NAN, family="x"):
    return ResultRow(family, metric, value, layer=layer, adapter=f"rank_{rank}", rank=rank, ci_low=lo, ci_high=hi,
                     null_value=null)


def _find(rows, key):
    return {f.key: f for f in compute_findings(rows_to_frame(rows))}[key]


def _fvu_rows(adapter_fvu, ref_fvu):
    """adapter_fvu/ref_fvu: {(layer, rank): (value, lo, hi)}."""
    rows = []
    for (layer, rank), v in adapter_fvu.items():
        rows.append(_row("fvu_adapter_sae", layer, rank, *v))
        rows.append(_row("fvu_ref_on_delta", layer, rank, *ref_fvu[(layer, rank)]))
    return rows


CELLS = [(3, 4), (3, 16), (6, 4), (6, 16)]


def test_reconstruction_holds_when_adapter_fvu_is_clearly_lower_everywhere():
    f = _find(_fvu_rows({c: (0.08, 0.07, 0.09) for c in CELLS}, {c: (0.62, 0.60, 0.64) for c in CELLS}),
              "reconstruction")
    assert f.verdict == HOLDS
    assert f.numbers["cells"] == 4 and f.numbers["cells_passing"] == 4
    assert f.numbers["improvement_pct"] == pytest.approx(100 * 0.54 / 0.62, rel=1e-12)  # computed: row absent
    assert "0.08 [0.07, 0.09]" in f.text and "0.62 [0.6, 0.64]" in f.text and "layer 6, rank 16" in f.text


def test_reconstruction_does_not_hold_when_reversed_or_cis_overlap():
    rev = _find(_fvu_rows({c: (0.7, 0.68, 0.72) for c in CELLS}, {c: (0.3, 0.28, 0.32) for c in CELLS}),
                "reconstruction")
    assert rev.verdict == NOT_HOLDS and rev.numbers["cells_passing"] == 0
    # lower point estimate but overlapping CIs is not "better"
    overlap = _find(_fvu_rows({c: (0.50, 0.40, 0.60) for c in CELLS}, {c: (0.55, 0.50, 0.60) for c in CELLS}),
                    "reconstruction")
    assert overlap.verdict == NOT_HOLDS


def test_reconstruction_mixed_and_not_measured():
    ad = {c: (0.08, 0.07, 0.09) for c in CELLS}
    ref = {c: (0.62, 0.60, 0.64) for c in CELLS}
    ref[(3, 4)] = (0.08, 0.075, 0.085)
    f = _find(_fvu_rows(ad, ref), "reconstruction")
    assert f.verdict == MIXED and f.numbers["cells_passing"] == 3
    assert _find([_row("fvu_adapter_sae", 3, 4, 0.1)], "reconstruction").verdict == NOT_MEASURED


def test_alignment_weak_below_midpoint_of_null_and_ceiling():
    rows = [_row("mmcs_adapter_to_ref", 15, 16, 0.31, 0.30, 0.32, null=0.07),
            _row("mmcs_seed_vs_seed", 15, 16, 0.85)]
    f = _find(rows, "alignment")
    assert f.verdict == HOLDS  # 0.31 < (0.07 + 0.85) / 2 = 0.46
    assert "0.31 [0.3, 0.32]" in f.text and "null 0.07" in f.text and "ceiling 0.85" in f.text
    assert f.numbers["cells_above_null"] == 1
    strong = [_row("mmcs_adapter_to_ref", 15, 16, 0.5, null=0.07), _row("mmcs_seed_vs_seed", 15, 16, 0.85)]
    assert _find(strong, "alignment").verdict == NOT_HOLDS  # 0.5 >= 0.46
    # no second seed: ceiling 1, midpoint (0.07 + 1) / 2 = 0.535
    no_seed = _find([_row("mmcs_adapter_to_ref", 15, 16, 0.5, null=0.07)], "alignment")
    assert no_seed.verdict == HOLDS and no_seed.numbers["ceiling"] != no_seed.numbers["ceiling"]  # NaN reported
    assert _find([], "alignment").verdict == NOT_MEASURED


def _l0_rows(per_layer):
    return [_row("l0_adapter_sae", layer, r, v) for layer, vals in per_layer.items()
            for r, v in zip((4, 8, 16, 32), vals, strict=False)]


def test_density_trend_by_spearman_sign_per_layer():
    up = {3: [12, 15, 20, 25], 6: [10, 11, 30, 31], 9: [12, 14, 13, 31]}
    f = _find(_l0_rows(up), "density_rank")
    assert f.verdict == HOLDS and f.numbers["layers_passing"] == 3
    assert "L0 12→31 from rank 4 to 32 at layer 9" in f.text and "3/3 layers" in f.text
    mixed = _find(_l0_rows({3: [12, 15, 20, 25], 6: [30, 20, 10, 5]}), "density_rank")
    assert mixed.verdict == MIXED
    down = _find(_l0_rows({3: [25, 20, 15, 12]}), "density_rank")
    assert down.verdict == NOT_HOLDS and down.numbers["spearman_by_layer"]["3"] == -1.0
    flat = _find(_l0_rows({3: [10, 10, 10, 10]}), "density_rank")  # ρ undefined: no rise
    assert flat.verdict == NOT_HOLDS
    one_rank = _find([_row("l0_adapter_sae", 3, 4, 10.0)], "density_rank")
    assert one_rank.verdict == NOT_MEASURED


def test_density_uses_alive_latents_when_topk_fixes_l0():
    rows = _l0_rows({3: [16, 16, 16, 16]}) + [_row("alive_latents_adapter_sae", 3, r, v)
                                              for r, v in zip((4, 8, 16, 32), (900, 950, 1000, 1100), strict=True)]
    f = _find(rows, "density_rank")
    assert f.verdict == HOLDS and f.text.startswith("L0 is fixed at 16") and "alive latents 900→1.1e+03" in f.text


def _free_l0_rows(per_layer):
    return [dataclasses.replace(_row("l0_fixed_coefficient", layer, r, v, family="density"), note="paper_a, λ=0.2")
            for layer, vals in per_layer.items() for r, v in zip((4, 8, 16, 32), vals, strict=False)]


def test_density_reads_the_free_l0_sae_when_the_table_has_it():
    topk = _l0_rows({3: [16, 16, 16, 16], 9: [16, 16, 16, 16]})  # pinned by TopK
    alive = [_row("alive_latents_adapter_sae", layer, r, v) for layer in (3, 9)
             for r, v in zip((4, 8, 16, 32), (1100, 1000, 950, 900), strict=True)]  # would say "does not hold"
    free = _free_l0_rows({3: [1.2, 1.5, 2.0, 2.6], 9: [2.0, 2.4, 3.1, 4.2]})
    f = _find(topk + alive + free, "density_rank")
    assert f.verdict == HOLDS and f.numbers["metric"] == "l0_fixed_coefficient"
    assert "L0 of the free-L0 SAE (paper_a, λ=0.2) 2→4.2 from rank 4 to 32 at layer 9" in f.text
    depth = _find(topk + alive + free, "density_depth")
    assert depth.verdict == HOLDS and depth.numbers["adapters_passing"] == 4
    assert "from layer 3 to 9 at rank 32" in depth.text and "free-L0 SAE (paper_a, λ=0.2)" in depth.text
    shallow = _find(free[:4] + _free_l0_rows({9: [1.0, 1.6, 1.9, 2.0]}), "density_depth")  # falls at ranks 8..32
    assert shallow.verdict == MIXED and shallow.numbers["adapters_passing"] == 1
    # without free-L0 rows: today's behaviour (alive latents under a TopK pin), and no depth finding
    old = {f.key: f for f in compute_findings(rows_to_frame(topk + alive))}
    assert "density_depth" not in old and old["density_rank"].text.startswith("L0 is fixed at 16")
    assert old["density_rank"].verdict == NOT_HOLDS


def test_splice_subspace_and_effective_rank_rules():
    splice = [_row("kl_recovered_adapter_sae", 3, 4, 0.9, 0.88, 0.92),
              _row("kl_recovered_ref_diff", 3, 4, 0.4, 0.38, 0.42),
              _row("kl_recovered_adapter_sae", 3, 16, 0.5, 0.3, 0.7),
              _row("kl_recovered_ref_diff", 3, 16, 0.45, 0.4, 0.5)]
    s = _find(splice, "splice")
    assert s.verdict == MIXED and s.numbers["cells_passing"] == 1
    sub = [_row("mean_cos2_pca", 3, 4, 0.4, 0.35, 0.45, null=0.125), _row("mean_cos2_pca", 3, 16, 0.13, 0.1, 0.16,
                                                                        null=0.125)]
    assert _find(sub, "subspace").verdict == MIXED
    assert _find(sub[:1], "subspace").verdict == HOLDS
    er = [_row("pca_k90", 3, 4, 9.0), _row("pca_k90", 3, 16, 12.0)]
    f = _find(er, "effective_rank")
    assert f.verdict == MIXED and f.numbers["cells_passing"] == 1


def test_fake_run_findings_all_hold_and_markdown(reported_run):
    run, _, _ = reported_run
    df = load_run(run).df
    findings = compute_findings(df)
    assert {f.verdict for f in findings} == {HOLDS}
    md = findings_markdown(df)
    for f in findings:
        assert f.title in md and f.rule in md
    assert md.count("*holds*") == len(findings)
