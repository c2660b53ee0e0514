"""The identity check used to show a refactor changed no result: compare_tables and the benchmark script."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from lorascope.results import ResultRow, compare_tables, rows_to_frame

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_results.py"


def _table(value: float = 0.5, extra: bool = False, note: str = ""):
    rows = [
        ResultRow(
            "reconstruction",
            "fvu_adapter_sae",
            value,
            layer=3,
            adapter="rank_4",
            rank=4,
            ci_low=0.4,
            ci_high=math.nan,
            note=note,
        ),
        ResultRow("cka", "cka_delta_vs_rank_4", 1.0, layer=3, adapter="rank_8", rank=8),
    ]
    if extra:
        rows.append(ResultRow("splice", "kl_recovered_adapter_sae", 0.9, layer=3, adapter="rank_4", rank=4))
    return rows_to_frame(rows)


def test_identical_tables_in_any_row_order():
    a = _table()
    assert compare_tables(a, a.iloc[::-1].reset_index(drop=True)).identical


def test_values_within_tolerance_and_nan_equal_nan():
    assert compare_tables(_table(0.5), _table(0.5 + 1e-13)).identical
    d = compare_tables(_table(0.5), _table(0.5001))
    assert not d.identical and d.changed == [
        (("reconstruction", "fvu_adapter_sae", 3, "rank_4", 4), "value", 0.5, 0.5001)
    ]
    assert compare_tables(_table(0.5), _table(0.5001), rtol=1e-3).identical


def test_missing_rows_and_text_columns_are_reported():
    d = compare_tables(_table(extra=True), _table())
    assert d.only_a == [("splice", "kl_recovered_adapter_sae", 3, "rank_4", 4)] and not d.only_b
    d = compare_tables(_table(note="x"), _table(note="y"))
    assert [c[1] for c in d.changed] == ["note"]
    assert "1 differing values" in d.lines()[0]


def test_script_compares_tables_and_figures(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for run, fig in (("a", b"png-1"), ("b", b"png-1")):
        (tmp_path / run / "results").mkdir(parents=True)
        (tmp_path / run / "figures").mkdir()
        _table().to_parquet(tmp_path / run / "results" / "results.parquet")
        (tmp_path / run / "figures" / "f.png").write_bytes(fig)
    assert mod.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip().endswith("IDENTICAL")
    (tmp_path / "b" / "figures" / "f.png").write_bytes(b"png-2")
    assert mod.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "figure differs: f.png" in capsys.readouterr().out
