"""Figures: every figure is written as PNG + SVG from a fake run, deterministically, and skipped without data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from lorascope.errors import LorascopeError
from lorascope.report import FIGURES, load_run, make_all_figures, render_figures, write_fake_run
from lorascope.report import figures as F
from lorascope.results import COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_make_all_figures_writes_every_figure(reported_run):
    run, paths, _ = reported_run
    names = {s.name for s in FIGURES}
    assert {p.stem for p in paths} == names  # the fake run has data for every figure
    assert sorted(p.name for p in paths) == sorted(f"{n}.{ext}" for n in names for ext in ("png", "svg"))
    for p in paths:
        assert p.parent == run / "figures" and p.is_file()
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 5000
        else:
            root = ET.parse(p).getroot()
            assert root.tag.endswith("svg")
            assert len(list(root.iter())) > 50  # real drawing, not an empty canvas
    assert not list((run / "figures").glob(".tmp-*"))


def test_fake_run_is_deterministic(tmp_path):
    a, b = write_fake_run(tmp_path / "a", seed=3), write_fake_run(tmp_path / "b", seed=3)
    for rel in ("results/results.csv", "results/contexts.json", "results/meta.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    ra, rb = load_run(a), load_run(b)
    pd.testing.assert_frame_equal(ra.df, rb.df)
    assert ra.arrays.keys() == rb.arrays.keys() and len(ra.arrays) == 4
    for k in ra.arrays:
        for name, arr in ra.arrays[k].items():
            np.testing.assert_array_equal(arr, rb.arrays[k][name])
    c = write_fake_run(tmp_path / "c", seed=4)
    assert (a / "results/results.csv").read_bytes() != (c / "results/results.csv").read_bytes()


def test_figure_bytes_are_deterministic(reported_run, tmp_path):
    run, _, _ = reported_run
    df = load_run(run).df
    p1 = F.cka(df, tmp_path / "one")
    p2 = F.cka(df, tmp_path / "two")
    assert [p.name for p in p1] == ["cka.png", "cka.svg"]
    for x, y in zip(p1, p2, strict=True):
        assert x.read_bytes() == y.read_bytes()


def test_figures_drawn_with_a_helper_process_are_the_same_files_in_the_same_order(reported_run, tmp_path, monkeypatch):
    run, paths, _ = reported_run
    few = [s for s in FIGURES if s.name in ("cka", "splice_kl", "reconstruction_improvement")]  # cheap ones
    monkeypatch.setattr(F, "FIGURES", few)  # what the queue holds (the helper looks names up in its own list)
    alone = {p.name: p.read_bytes() for p in paths if p.stem in {s.name for s in few}}
    r = load_run(run)
    # the helper alone (this process takes nothing from the queue): every queued figure, byte for byte
    helper = F._FigureHelper.start(run, tmp_path / "helper")
    by_helper = helper.finish()
    assert sorted(by_helper) == sorted(s.name for s in few)
    # both processes: the figures in FIGURES order (the report embeds them in it), the same bytes
    monkeypatch.setattr(F, "_cores", lambda: 2)
    made = render_figures(r.df, tmp_path / "both", r.arrays, run_dir=run)
    assert list(made) == [s.name for s in few if by_helper[s.name]]
    for drawn in (by_helper, made):
        files = [p for ps in drawn.values() for p in ps]
        assert sorted(p.name for p in files) == sorted(alone)
        assert all(p.read_bytes() == alone[p.name] for p in files)


def test_figures_skip_cleanly_without_data(tmp_path):
    empty = pd.DataFrame(columns=COLUMNS)
    for spec in FIGURES:
        assert spec.make(empty, tmp_path, None) == [], spec.name
        assert spec.make(empty, tmp_path, {}) == [], spec.name
    assert render_figures(empty, tmp_path, {}) == {}
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_figures_skip_when_their_family_is_absent(reported_run, tmp_path):
    run, _, _ = reported_run
    r = load_run(run)
    no_recon = r.df[r.df["family"] != "reconstruction"]
    assert F.reconstruction_fvu(no_recon, tmp_path) == []
    assert F.reconstruction_improvement(no_recon, tmp_path) == []
    assert F.splice_kl(r.df[r.df["family"] != "splice"], tmp_path) == []
    assert F.cka(r.df[r.df["family"] != "cka"], tmp_path) == []
    # array-based figures need their array keys
    stripped = {k: {n: a for n, a in v.items() if n == "delta_norms"} for k, v in r.arrays.items()}
    for fig in (F.density_histograms, F.best_match_cosines, F.principal_angles):
        assert fig(r.df, tmp_path, stripped) == []
    assert not any(tmp_path.iterdir())


def test_make_all_figures_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(LorascopeError, match="no results table"):
        make_all_figures(tmp_path)
    with pytest.raises(LorascopeError, match="does not exist"):
        make_all_figures(tmp_path / "missing")


def test_results_table_reads_back_from_csv_when_parquet_is_absent(tmp_path):
    run = write_fake_run(tmp_path / "r", seed=1)
    from_pq = load_run(run).df
    (run / "results" / "results.parquet").unlink()
    from_csv = load_run(run).df
    pd.testing.assert_frame_equal(from_pq, from_csv, check_exact=False, rtol=1e-12)


def test_principal_angles_of_a_quickstart_sized_study_draw_without_layout_warnings(tmp_path):
    """Three layers × four ranks × four subspace comparisons (the quickstart's): one shared legend, not a legend
    per panel that squeezes the axes to nothing (matplotlib's "axes sizes collapsed to zero")."""
    import warnings

    r = load_run(write_fake_run(tmp_path / "run", seed=2, layers=(6, 14, 22), ranks=(4, 8, 16, 32)))
    rng = np.random.default_rng(0)
    names = ("pca_delta_vs_ref_topk", "pca_delta_vs_adapter_topk", "pca_delta_vs_lora_colspace", "a_vs_b")
    arrays = {cell: {f"principal_angles_{n}": np.sort(rng.uniform(0, 1.5, 8)) for n in names} for cell in r.arrays}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        paths = F.principal_angles(r.df, tmp_path / "fig", arrays)
    assert [p.name for p in paths] == ["principal_angles.png", "principal_angles.svg"]
    svg = paths[1].read_text()
    assert all(n.replace("_", " ") in svg for n in names)  # the comparison names in the one legend
