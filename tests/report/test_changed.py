"""The "What the adapter changed" section: a stub when the run has no explain outputs, deterministic heatmaps,
the attribution table's pivot into per-feature module type × block panels."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from lorascope.report.changed import OTHER, TITLE, attribution_figure, attribution_grid, changed_section, heatmap


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


def _attribution(shares: dict[tuple[int, str], float], remainder: dict[int, float]) -> pd.DataFrame:
    rows = [(f, m, s) for (f, m), s in shares.items()] + [(f, "remainder", s) for f, s in remainder.items()]
    return pd.DataFrame(
        [{"adapter": "a", "layer": 3, "feature": f, "module": m, "contribution": 2 * s, "share": s} for f, m, s in rows]
    )


# Feature 7 lacks 0.mlp.down_proj; no LoRA module in block 2; block 3 has only q_proj.
SHARES = {
    (7, "0.self_attn.q_proj"): 0.1,
    (7, "0.self_attn.v_proj"): -0.2,
    (7, "1.mlp.down_proj"): 0.3,
    (7, "3.self_attn.q_proj"): 0.0,
    (3, "0.self_attn.q_proj"): 0.4,
    (3, "0.mlp.down_proj"): -0.5,
    (3, "1.self_attn.v_proj"): 2.5,
}


def test_attribution_grid_puts_each_share_in_its_feature_type_block_cell():
    g = attribution_grid(_attribution(SHARES, {7: 0.8, 3: -1.4}))
    assert g.features == [7, 3]  # first-appearance order
    assert g.types == ["q_proj", "v_proj", "down_proj"] and g.columns == ["0", "1", "2", "3"]
    want = np.full((2, 3, 4), np.nan)
    want[0, 0, 0], want[0, 1, 0], want[0, 2, 1], want[0, 0, 3] = 0.1, -0.2, 0.3, 0.0
    want[1, 0, 0], want[1, 2, 0], want[1, 1, 1] = 0.4, -0.5, 2.5
    np.testing.assert_array_equal(g.shares, want)  # missing modules are NaN, a measured 0 stays 0
    np.testing.assert_array_equal(g.remainder, [0.8, -1.4])
    no_rem = attribution_grid(_attribution(SHARES, {7: 0.8}))
    assert no_rem.remainder[0] == 0.8 and math.isnan(no_rem.remainder[1])


def test_attribution_grid_keeps_whole_paths_when_the_short_names_collide():
    g = attribution_grid(_attribution({(1, "0.attn.c_proj"): 0.1, (1, "0.mlp.c_proj"): 0.2}, {1: 0.7}))
    assert g.types == ["attn.c_proj", "mlp.c_proj"] and g.columns == ["0"]


def test_modules_without_a_block_index_get_a_column_of_their_own():
    mixed = {**SHARES, (7, "lm_head"): 0.6, (3, "embed_tokens"): -0.7}
    g = attribution_grid(_attribution(mixed, {7: 0.8, 3: -1.4}))
    assert g.types == ["q_proj", "v_proj", "down_proj", "lm_head", "embed_tokens"]
    assert g.columns == ["0", "1", "2", "3", OTHER]
    assert g.shares[0, 3, 4] == 0.6 and g.shares[1, 4, 4] == -0.7
    assert np.isnan(g.shares[:, 3:, :4]).all() and np.isnan(g.shares[:, :3, 4]).all()
    flat = attribution_grid(_attribution({(5, "lm_head"): 0.3, (5, "wte"): -0.1}, {5: 0.8}))
    assert flat.types == ["lm_head", "wte"] and flat.columns == [OTHER]
    np.testing.assert_array_equal(flat.shares, [[[0.3], [-0.1]]])


def test_attribution_figure_has_one_titled_panel_per_feature_and_block_ticks_at_the_bottom():
    blocks = {(f, f"{b}.{t}"): 0.01 * (b - 10) * (f % 3 - 1) for f in (11, 22, 33) for b in range(23) for t in "qkv"}
    fig = attribution_figure(attribution_grid(_attribution(blocks, {11: 0.62, 22: -0.5, 33: 1.0})), "rank_4")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 and len(fig.axes) == 4  # one shared colour bar
    assert [ax.get_title(loc="left") for ax in panels] == [
        "f11 · remainder 0.62",
        "f22 · remainder -0.50",
        "f33 · remainder 1.00",
    ]
    assert all([t.get_text() for t in ax.get_yticklabels()] == ["q", "k", "v"] for ax in panels)
    bottom = panels[-1]
    assert bottom.get_xlabel() == "block" and [t.get_text() for t in bottom.get_xticklabels()] == [
        str(b) for b in range(23)
    ]
    assert not any(t.get_visible() for ax in panels[:-1] for t in ax.get_xticklabels())
    lims = {ax.images[0].get_clim() for ax in panels}
    assert len(lims) == 1 and lims.pop() == pytest.approx((-0.12, 0.12))  # symmetric, shared: the largest |share|
    width, height = fig.get_size_inches()
    assert 8 <= width <= 10 and height < 8
    cancelling = attribution_figure(attribution_grid(_attribution(SHARES, {7: 0.8, 3: -1.4})), "a")
    assert (
        cancelling.axes[0].images[0].get_clim() == (-1.0, 1.0)
        and cancelling.axes[-2].images[0].colorbar.extend == "max"
    )


def test_heatmap_draws_tables_without_block_indices_and_without_layout_warnings(tmp_path):
    blocks = {(f, f"{b}.mlp.{t}"): 0.02 * b for f in (1, 2) for b in range(40) for t in ("up_proj", "down_proj")}
    for name, shares in (("blocks", blocks), ("flat", {(5, "lm_head"): 0.3, (5, "wte"): -0.1})):
        csv = tmp_path / f"attribution_{name}.csv"
        _attribution(shares, {1: 0.5, 2: 0.1, 5: 0.8}).to_csv(csv, index=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. constrained layout's "axes sizes collapsed to zero"
            png = heatmap(csv, tmp_path / "fig", name)
        assert png == tmp_path / "fig" / f"attribution_{name}.png" and png.with_suffix(".svg").is_file()
    only_remainder = tmp_path / "attribution_r.csv"
    _attribution({}, {1: 1.0}).to_csv(only_remainder, index=False)
    assert heatmap(only_remainder, tmp_path / "fig", "r") is None


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
