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
