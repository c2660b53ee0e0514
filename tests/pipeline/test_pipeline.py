"""A miniature study (tiny random Llama, two ranks, one layer) through the whole pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from lorascope.config import load_config, parse_config
from lorascope.errors import LorascopeError
from tiny_models import miniature_study_config as mini_config

# the free-L0 density stage, on for the miniature study (off by default)
DENSITY = {"enabled": True, "expansion": 2, "tokens": 1024, "batch_size": 128}


@pytest.fixture(scope="module")
def mini_run(tiny_llama_dir, tmp_path_factory):
    from lorascope.study import run

    out = tmp_path_factory.mktemp("mini_run")
    cfg = parse_config(mini_config(tiny_llama_dir, out, density=DENSITY))
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


def test_rerun_does_no_work_and_changed_setting_reruns_only_downstream(mini_run, tiny_llama_dir):
    from lorascope.study import run

    cfg, first = mini_run
    again = run(cfg, progress=False)
    assert again.work_done == []
    changed = parse_config(mini_config(tiny_llama_dir, Path(cfg.output_dir), density=DENSITY,
                                       **{"geometry.subspace_k": 3}))
    third = run(changed, progress=False)
    assert "geometry" in third.work_done
    assert not any(w.startswith(("adapters", "extraction", "sae:", "density")) for w in third.work_done)


def test_free_l0_density_rows_reach_the_table_and_the_finding(mini_run):
    import json

    from lorascope import results_schema as schema
    from lorascope.report import compute_findings

    cfg, res = mini_run
    df = res.table
    d_sae = DENSITY["expansion"] * json.loads((res.results_dir / "meta.json").read_text())["d_model"]
    for metric in (schema.L0_FIXED_COEFFICIENT, schema.FVU_FIXED_COEFFICIENT):
        rows = df[df.metric == metric]
        assert sorted(zip(rows.layer, rows.adapter, strict=True)) == [(1, "rank_2"), (1, "rank_4")], metric
        assert (rows.family == "density").all() and (rows.note == "paper_a, λ=0.2").all()
        assert (rows.d == d_sae).all() and (rows.n > 0).all()
    l0 = df[df.metric == schema.L0_FIXED_COEFFICIENT].value
    assert ((l0 > 0) & (l0 <= d_sae)).all(), l0  # free L0: not pinned at the TopK k of the adapter SAEs
    assert (df[df.metric == schema.FVU_FIXED_COEFFICIENT].value > 0).all()
    density = {f.key: f for f in compute_findings(df)}["density_rank"]
    assert density.numbers["metric"] == schema.L0_FIXED_COEFFICIENT
    assert "free-L0 SAE (paper_a, λ=0.2)" in density.text


def test_changed_density_setting_reruns_only_the_density_stage(mini_run, tiny_llama_dir):
    from lorascope.study import run

    cfg, _ = mini_run
    out = Path(cfg.output_dir)
    changed = parse_config(mini_config(tiny_llama_dir, out, density={**DENSITY, "l1_coefficient": 0.5,
                                                                     "matched_fvu_target": 0.5, "max_runs": 2}))
    res = run(changed, progress=False)
    assert [w for w in res.work_done if w != "report"] == ["density"]
    df = res.table
    assert set(df[df.metric == "l0_fixed_coefficient"].note) == {"paper_a, λ=0.5"}
    matched = df[df.metric == "l0_matched_fvu"]
    assert sorted(matched.adapter) == ["rank_2", "rank_4"]
    assert all(n.startswith("target FVU 0.5; ") for n in matched.note)
    assert run(changed, progress=False).work_done == []
    off = run(parse_config(mini_config(tiny_llama_dir, out)), progress=False)  # disabled: rows leave the table
    assert "l0_fixed_coefficient" not in set(off.table.metric)


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
