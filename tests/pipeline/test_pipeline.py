"""A miniature study (tiny random Llama, two ranks, one layer) through the whole pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lorascope.config import load_config, parse_config
from lorascope.errors import LorascopeError
from tiny_models import miniature_study_config as mini_config


@pytest.fixture(scope="module")
def mini_run(tiny_llama_dir, tmp_path_factory):
    from lorascope.study import run

    out = tmp_path_factory.mktemp("mini_run")
    cfg = parse_config(mini_config(tiny_llama_dir, out))
    return cfg, run(cfg, progress=False)


def test_every_row_is_finite_and_figures_exist(mini_run):
    cfg, res = mini_run
    df = res.table
    assert len(df) > 50
    assert set(df.adapter.unique()) >= {"rank_2", "rank_4"}
    for fam in ("delta_norm", "reconstruction", "density", "decoder_similarity", "subspace", "cka", "splice", "lora"):
        assert fam in set(df.family), fam
    bad = df[~df.value.map(math.isfinite)]
    assert bad.empty, bad[["family", "metric", "layer", "adapter", "value"]]
    if res.report is not None:
        assert res.report.is_file()
        figs = list((res.output_dir / "figures").glob("*.png"))
        assert figs and all(f.stat().st_size > 0 for f in figs)


def test_timing_record_lists_every_stage_and_reads_in_the_benchmark(mini_run):
    import importlib.util
    import json

    cfg, res = mini_run
    rec = json.loads((res.output_dir / "timings.json").read_text())
    stages = {"model_load", "adapters", "extraction", "saes", "geometry"} | ({"report"} if res.report else set())
    assert set(rec["stages"]) == stages and rec["reused"] == [] and rec["total"] == res.timings["total"]
    assert all(v > 0 for v in rec["stages"].values())
    assert sum(rec["stages"].values()) <= rec["total"]  # model loading is counted once, apart
    assert {"geometry/splice", "geometry/contexts", "geometry/analysis"} <= set(rec["detail"])
    sae_parts = [k for k in rec["detail"] if k.startswith("sae:")]
    assert len(sae_parts) == len(cfg.extraction.layers) * (2 * len(cfg.adapter_sae.seeds) + 1)
    assert math.isclose(sum(rec["detail"][k] for k in sae_parts), rec["stages"]["saes"])
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "study_stages.py"
    spec = importlib.util.spec_from_file_location("bench_study_stages_timings", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.read_stage_seconds(res.output_dir)["stages"] == rec["stages"]


def test_rerun_does_no_work_and_changed_setting_reruns_only_downstream(mini_run, tiny_llama_dir):
    from lorascope.study import run

    cfg, first = mini_run
    again = run(cfg, progress=False)
    assert again.work_done == []
    reused = json.loads((Path(cfg.output_dir) / "timings.json").read_text())["reused"]
    assert reused == ["adapters", "extraction", "saes", "geometry"] + (["report"] if first.report else [])
    changed = parse_config(mini_config(tiny_llama_dir, Path(cfg.output_dir), **{"geometry.subspace_k": 3}))
    third = run(changed, progress=False)
    assert "geometry" in third.work_done
    assert not any(w.startswith(("adapters", "extraction", "sae:")) for w in third.work_done)


def test_config_errors_name_the_key(tmp_path, tiny_llama_dir):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(mini_config(tiny_llama_dir, tmp_path / "o", **{"adapter_sae.k": -1})))
    with pytest.raises(LorascopeError, match=r"adapter_sae\.k"):
        load_config(p)
    cfg = mini_config(tiny_llama_dir, tmp_path / "o")
    cfg["extraction"]["layerz"] = [1]
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(LorascopeError, match="unknown key 'extraction.layerz'"):
        load_config(p)
    p.write_text("model: [unclosed\n")
    with pytest.raises(LorascopeError, match="not valid YAML"):
        load_config(p)


def test_layer_out_of_range_and_missing_adapter(tmp_path, tiny_llama_dir):
    from lorascope.study import run

    cfg = parse_config(mini_config(tiny_llama_dir, tmp_path / "o1", **{"extraction.layers": [7],
                                                                        "adapters.train": None,
                                                                        "adapters.load": {"x": str(tmp_path)}}))
    with pytest.raises(LorascopeError, match="no adapter_config.json"):
        run(cfg, progress=False)


def test_every_sae_has_its_own_initialisation(mini_run):
    """Shared random inits make two barely-trained SAEs look aligned (cos ≈ 1): the pipeline must never do that."""
    import json

    cfg, res = mini_run
    seeds = [json.loads(p.read_text())["metadata"]["init_seed"]
             for p in Path(cfg.output_dir).glob("saes/*/sae/cfg.json")]
    assert len(seeds) == 5 and len(set(seeds)) == 5
    df = res.table
    mmcs = df[(df.metric == "mmcs_adapter_to_ref")].value
    assert (mmcs < 0.95).all(), mmcs


def test_every_metric_is_declared_in_the_schema(mini_run):
    from lorascope.results_schema import lookup

    _, res = mini_run
    for (family, metric, null_name), _rows in res.table.groupby(["family", "metric", "null_name"]):
        m = lookup(metric)
        assert m is not None, metric
        assert m.family == family, (metric, m.family, family)
        assert m.null == null_name or (metric.startswith("fvu_noise") and null_name == "analytic_expectation"), metric
