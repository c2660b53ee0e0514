"""The "What the adapter changed" section: a stub when the run has no explain outputs, deterministic heatmaps."""

from __future__ import annotations

import pandas as pd

from lorascope.report.changed import TITLE, changed_section, heatmap


def test_stub_when_the_run_has_no_explain_outputs(tmp_path):
    html = changed_section(tmp_path, pd.DataFrame(), {})
    assert html.startswith(f"<section id='changed'><h2>{TITLE}</h2>") and "explain.enabled: false" in html


def test_heatmap_is_byte_identical_for_the_same_table(tmp_path):
    rows = [
        {"adapter": "a", "layer": 1, "feature": f, "module": m, "contribution": c, "share": c / 2}
        for f in (3, 7)
        for m, c in (("0.mlp.down_proj", 1.5), ("1.self_attn.o_proj", 0.25), ("remainder", 0.25))
    ]
    csv = tmp_path / "attribution_a.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    first = heatmap(csv, tmp_path / "f1", "a")
    second = heatmap(csv, tmp_path / "f2", "a")
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "f1" / "attribution_a.svg").read_bytes() == (tmp_path / "f2" / "attribution_a.svg").read_bytes()


def _explain_rows(kl: dict, markers: dict | None, n: int = 4):
    from lorascope import results_schema as schema
    from lorascope.results import ResultRow, rows_to_frame

    rows = [ResultRow(schema.EXPLAIN, schema.steer_kl_closed(k), v, layer=22, adapter="a", n=50) for k, v in kl.items()]
    rows += [
        ResultRow(schema.EXPLAIN, schema.marker_rate(k), v, layer=22, adapter="a", n=n)
        for k, v in (markers or {}).items()
    ]
    return rows_to_frame(rows)


def test_causal_reading_states_what_the_patched_answers_allow():
    from lorascope.report.changed import causal_reading

    kl = {"top_features": 0.2, "random_features": 0.01, "sae_reconstruction": 0.7, "exact_delta": 0.85}
    base = {"adapted": 1.0, "patch_exact_delta": 1.0, "patch_random_features": 0.0}
    error = causal_reading(
        _explain_rows(kl, {**base, "patch_top_features": 0.0, "patch_sae_reconstruction": 0.25}), "a"
    )
    assert "closes 0.2 of KL" in error and "random features: 0.01" in error and "Δ itself 0.85" in error
    assert "Δ gives the behaviour in 4/4 answers" in error and "whole reconstruction in 1/4" in error
    assert "reconstruction error" in error
    assert "smallest attainable p 0.0625" in error  # 4 answers: the counts are described, not tested
    assert "not tested" in causal_reading(
        _explain_rows(kl, {**base, "patch_top_features": 0.0, "patch_sae_reconstruction": 0.0}, n=8), "a"
    )
    carried = causal_reading(
        _explain_rows(kl, {**base, "patch_top_features": 0.5, "patch_sae_reconstruction": 1.0}), "a"
    )
    assert "top features in 2/4" in carried and "more often than random features" in carried
    spread = causal_reading(
        _explain_rows(kl, {**base, "patch_top_features": 0.0, "patch_sae_reconstruction": 1.0}), "a"
    )
    assert "spread over many features" in spread
    flat = {**base, "patch_exact_delta": 0.0, "patch_top_features": 0.0, "patch_sae_reconstruction": 0.0}
    assert "this layer alone does not carry it" in causal_reading(_explain_rows(kl, flat), "a")
    no_markers = causal_reading(_explain_rows(kl, None), "a")  # a non-demo task: KL only
    assert "closes 0.2 of KL" in no_markers and "Patched" not in no_markers
    assert causal_reading(_explain_rows({}, None), "a") == ""
