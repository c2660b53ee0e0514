"""benchmarks/study_stages.py reads a run's timing record (timings.json, or today's results/meta.json)."""

from __future__ import annotations

import json

import pytest


def test_reads_meta_json_timings_and_sums_the_saes(bench, tmp_path, capsys):
    S = bench("study_stages")
    (tmp_path / "results").mkdir()
    timings = {
        "adapters": 10.0,
        "extraction": 5.5,
        "sae:L6__rank_4__seed0": 2.0,
        "sae:L6__reference": 1.25,
        "geometry": 7.0,
    }
    (tmp_path / "results" / "meta.json").write_text(json.dumps({"timings": timings}))
    rec = S.read_stage_seconds(tmp_path)
    assert rec["stages"] == {"adapters": 10.0, "extraction": 5.5, "saes": 3.25, "geometry": 7.0}
    assert rec["detail"] == {"sae:L6__rank_4__seed0": 2.0, "sae:L6__reference": 1.25}
    S.main([str(tmp_path), "--detail"])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[3:]}
    assert rows["saes"] == ["3.2"] and rows["total"] == ["25.8"] and rows["sae:L6__reference"] == ["1.2"]


def test_timings_json_wins_and_two_runs_give_ratios(bench, tmp_path, capsys):
    S = bench("study_stages")
    before, after = tmp_path / "before", tmp_path / "after"
    for run, geo in ((before, 200.0), (after, 50.0)):
        (run / "results").mkdir(parents=True)
        (run / "results" / "meta.json").write_text(json.dumps({"timings": {"geometry": 1.0}}))
        (run / "timings.json").write_text(
            json.dumps({"stages": {"model_load": 4.0, "geometry": geo}, "total": geo + 4.0, "reused": []})
        )
    S.main([str(before), str(after)])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[4:]}
    assert rows["geometry"] == ["200.0", "50.0", "0.25"] and rows["model_load"] == ["4.0", "4.0", "1.00"]
    assert rows["total"] == ["204.0", "54.0", "0.26"]


def test_a_folder_without_timings_is_one_clear_error(bench, tmp_path):
    with pytest.raises(SystemExit, match="neither timings.json nor results/meta.json"):
        bench("study_stages").read_stage_seconds(tmp_path)
