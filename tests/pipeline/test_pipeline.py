"""A miniature study (tiny random Llama, two ranks, one layer) through the whole pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
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


def test_timing_record_lists_every_stage_and_reads_in_the_benchmark(mini_run):
    import importlib.util
    import json

    cfg, res = mini_run
    rec = json.loads((res.output_dir / "timings.json").read_text())
    stages = {"model_load", "adapters", "extraction", "saes", "geometry", "explain", "density"}
    stages |= {"report"} if res.report else set()
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


def test_heldout_base_loss_is_computed_once_and_equals_a_paired_evaluation(mini_run):
    from lorascope.models import held_out_loss, load_adapters, load_base
    from lorascope.study.adapters import finetune_examples

    cfg, _ = mini_run
    done = [
        Path(cfg.output_dir) / "adapters" / d
        for d in sorted(p.name for p in (Path(cfg.output_dir) / "adapters").iterdir())
    ]
    infos = {json.loads((d / "done.json").read_text())["info"]["heldout_loss_base"]: d for d in done}
    assert len(done) == 2 and len(infos) == 1  # one base loss for both ranks
    # the second rank evaluated its adapter alone; evaluated beside the base rows it gives the same bits
    last = next(d for d in done if d.name.startswith("rank_4-"))
    base = load_base(cfg.model.spec)
    pm = load_adapters(base, {"a": last / "adapter"})
    got = held_out_loss(
        pm, base.tokenizer, finetune_examples(cfg)[1][:16], ["__base__", "a"], max_length=cfg.data.max_length
    )
    pm.unload()
    info = json.loads((last / "done.json").read_text())["info"]
    assert (got["__base__"], got["a"]) == (info["heldout_loss_base"], info["heldout_loss_adapted"])


def test_adapters_trained_in_two_processes_equal_the_single_process_ones(mini_run, tiny_llama_dir, tmp_path):
    import os

    from safetensors.torch import load_file

    from lorascope.study.adapters import stage_adapters, training_workers
    from lorascope.study.cache import RunState

    cfg, _ = mini_run
    single = Path(cfg.output_dir) / "adapters"
    two = parse_config(mini_config(tiny_llama_dir, tmp_path / "two", density=DENSITY, **{"adapters.train.workers": 2}))
    cores = len(os.sched_getaffinity(0))
    assert training_workers(two, 2) == ((2, cores // 2) if cores >= 2 else (1, 1))
    made = stage_adapters(RunState(two, tmp_path / "two", progress=False))
    # the same stage folders (the process count is not an input of an adapter), the same bytes and numbers
    assert {a.path.parent.name for a in made} == {p.name for p in single.iterdir()}
    for a in made:
        ours = load_file(str(a.path / "adapter_model.safetensors"))
        theirs = load_file(str(single / a.path.parent.name / "adapter" / "adapter_model.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), a.name
        info = json.loads((a.path.parent / "done.json").read_text())["info"]
        assert info == json.loads((single / a.path.parent.name / "done.json").read_text())["info"]


def test_rerun_does_no_work_and_changed_setting_reruns_only_downstream(mini_run, tiny_llama_dir):
    from lorascope.study import run

    cfg, first = mini_run
    again = run(cfg, progress=False)
    assert again.work_done == []
    reused = json.loads((Path(cfg.output_dir) / "timings.json").read_text())["reused"]
    assert reused == ["adapters", "extraction", "saes", "geometry"] + (["report"] if first.report else [])
    changed = parse_config(
        mini_config(tiny_llama_dir, Path(cfg.output_dir), density=DENSITY, **{"geometry.subspace_k": 3})
    )
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
    fixed = df[df.metric == schema.L0_FIXED_COEFFICIENT]
    assert (fixed.ci_unit == "document").all() and (fixed.ci_low <= fixed.value).all()
    assert (fixed.value <= fixed.ci_high).all() and (fixed.ci_low < fixed.ci_high).all()
    trend = df[df.metric == schema.TREND_FREE_L0_RANK]
    assert list(trend.layer) == [1] and (trend.ci_unit == "document").all()  # 2 ranks at the one layer
    l0_by_rank = fixed.set_index("adapter").value
    assert trend.value.iloc[0] == pytest.approx(l0_by_rank["rank_4"] - l0_by_rank["rank_2"], rel=1e-6)  # log2 4/2=1
    assert df[df.metric == schema.TREND_FREE_L0_DEPTH].empty  # one layer: no depth trend
    found = {f.key: f for f in compute_findings(df)}
    density = found["density_rank"]
    assert "Free-L0 SAE (paper_a, λ=0.2)" in density.text and "free-L0 SAE's L0" in density.rule
    assert density.verdict == "not testable here"  # two ranks: no permutation test can reach p <= 0.05
    assert found["density_depth"].verdict == "not measured"


def test_changed_density_setting_reruns_only_the_density_stage(mini_run, tiny_llama_dir):
    from lorascope.study import run

    cfg, _ = mini_run
    out = Path(cfg.output_dir)
    changed = parse_config(
        mini_config(
            tiny_llama_dir, out, density={**DENSITY, "l1_coefficient": 0.5, "matched_fvu_target": 0.5, "max_runs": 2}
        )
    )
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

    cfg = parse_config(
        mini_config(
            tiny_llama_dir,
            tmp_path / "o1",
            **{"extraction.layers": [7], "adapters.train": None, "adapters.load": {"x": str(tmp_path)}},
        )
    )
    with pytest.raises(LorascopeError, match="no adapter_config.json"):
        run(cfg, progress=False)


def test_every_sae_has_its_own_initialisation(mini_run):
    """Shared random inits make two barely-trained SAEs look aligned (cos ≈ 1): the pipeline must never do that."""
    import json

    cfg, res = mini_run
    seeds = [
        json.loads(p.read_text())["metadata"]["init_seed"] for p in Path(cfg.output_dir).glob("saes/*/sae/cfg.json")
    ]
    assert len(seeds) == 5 and len(set(seeds)) == 5
    df = res.table
    mmcs = df[(df.metric == "mmcs_adapter_to_ref")].value
    assert (mmcs < 0.95).all(), mmcs


def test_every_metric_is_declared_in_the_schema(mini_run):
    from lorascope.results_schema import lookup

    _, res = mini_run
    for (family, metric, null_name), rows in res.table.groupby(["family", "metric", "null_name"]):
        m = lookup(metric)
        assert m is not None, metric
        assert m.family == family, (metric, m.family, family)
        no_null = null_name == "" and rows.null_value.isna().all()  # e.g. CKA's diagonal: nothing to read against
        assert (
            m.null == null_name or no_null or (metric.startswith("fvu_noise") and null_name == "analytic_expectation")
        ), metric
        units = set(rows.ci_unit) - {""}
        assert units <= set(m.ci.split("|")), (metric, units, m.ci)
        assert rows[rows.ci_low.notna()].ci_unit.ne("").all(), metric  # every interval says what it resampled


# ---- honest verdicts through the study's own code on the miniature run -------------------------------------------


def _mini_parts(mini_run):
    """(store, config, {seed: adapter SAE} of rank_4 at layer 1, reference SAE path) of the miniature run."""
    from lorascope.activations import open_store
    from lorascope.saes import load_sae

    cfg, res = mini_run
    out = Path(res.output_dir)
    store = open_store(next((out / "activations").glob("store-*")) / "store")
    saes = {s: load_sae(next((out / "saes").glob(f"L1__rank_4__seed{s}-*")) / "sae") for s in (0, 1)}
    return store, cfg, saes, next((out / "saes").glob("L1__reference-*")) / "sae"


def _verdicts(rows):
    from lorascope.report.findings import compute_findings
    from lorascope.results import rows_to_frame

    return {f.key: f.verdict for f in compute_findings(rows_to_frame(rows))}


def _analyse(store, cfg, adapter_saes, reference):
    from lorascope.study.analysis import LayerAdapterInputs, Settings, analyse_layer_adapter
    from lorascope.study.splits import study_holdout

    held = store.held_out(1, "rank_4", study_holdout(cfg))
    train = store.held_out(1, "rank_4", study_holdout(cfg), split="train")
    inp = LayerAdapterInputs(
        1,
        "rank_4",
        4,
        held.base,
        held.delta,
        adapter_saes,
        reference,
        doc_index=held.doc_index,
        train_delta_cov=torch.cov(train.delta.double().T),
    )
    return analyse_layer_adapter(inp, Settings(subspace_k=4, n_boot=100, cka_max_tokens=400, seed=0)).rows


def _train_like_the_study(store, cfg, seed: int, held_out_fraction: float, ckpt: Path, tokens: int | None = None):
    """An SAE of the adapter-SAE recipe on rank_4's Δ at layer 1, trained by the study's own job runner."""
    from lorascope.study.saes import SAEJob, train_sae_job, trainer_config

    section = cfg.adapter_sae if tokens is None else cfg.adapter_sae.model_copy(update={"tokens": tokens})
    job = SAEJob(1, "delta", "rank_4", seed, held_out_fraction, cfg.seed, 7_000 + seed, {"init_seed": 7_000 + seed})
    trainer = trainer_config(section, seed, checkpoints=1, warmup_steps=1)
    return train_sae_job(store, job, section, trainer, None, ckpt, progress=False).sae


def test_aa_world_alignment_reaches_the_ceiling_and_is_never_weak(mini_run, tmp_path):
    """A/A on the tiny model: the "reference" is a third SAE of the adapter recipe trained on the same Δ with
    another seed. Its MMCS to the adapter SAE reaches the seed-vs-seed ceiling and is never called "weak". (The
    tiny LoRA's Δ has participation ratio ≈ 1.5, so random atoms with Δ's covariance all fall on its top
    direction and their MMCS matches or exceeds even the ceiling: the verdict there is "not testable here" — the
    recipe's own seeds do not beat what Δ's geometry forces. The synthetic A/A world of test_null_worlds.py, with
    a rich Δ, reads "at ceiling".)"""
    store, cfg, _, _ = _mini_parts(mini_run)
    # the miniature's own SAEs see 1024 tokens and barely leave their initialisation; these see 16x more
    sae0, sae1, reference = (
        _train_like_the_study(store, cfg, seed, cfg.data.held_out_fraction, tmp_path / f"ckpt{seed}", tokens=16_384)
        for seed in (0, 1, 2)
    )
    rows = _analyse(store, cfg, [sae0, sae1], reference)
    shown = "; ".join(
        f"{r.metric} {r.value:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] null {r.null_value:.3f}"
        for r in rows
        if r.metric.startswith("mmcs")
    )
    value = next(r for r in rows if r.metric == "mmcs_adapter_to_ref")
    ceiling = next(r for r in rows if r.metric == "mmcs_seed_vs_seed")
    assert value.ci_high >= ceiling.ci_low, shown
    verdict = _verdicts(rows)["alignment"]
    assert verdict == ("at ceiling" if ceiling.ci_low > value.null_value else "not testable here"), shown


def test_no_effect_world_reports_no_alignment_and_no_reconstruction(mini_run):
    """No effect: random dictionaries (the adapter recipe at fresh initialisations) stand in for the adapter SAE."""
    from lorascope.saes import create_sae, load_sae

    store, cfg, saes, ref_path = _mini_parts(mini_run)
    c = saes[0].cfg
    random_saes = [create_sae(c.architecture, c.d_in, c.d_sae, seed=555 + i, **c.arch) for i in range(2)]
    rows = _analyse(store, cfg, random_saes, load_sae(ref_path))
    v = _verdicts(rows)
    assert v["reconstruction"] == "does not hold"
    # two random dictionaries agree no better than the strongest null: "no alignment" needs a ceiling above it
    # (test_null_worlds.py: a reproducible random dictionary in a rich-Δ world reads "no alignment")
    value = next(r for r in rows if r.metric == "mmcs_adapter_to_ref")
    ceiling = next(r for r in rows if r.metric == "mmcs_seed_vs_seed")
    assert v["alignment"] == ("no alignment" if ceiling.ci_low > value.null_value else "not testable here")


def test_reference_trained_on_held_out_documents_is_refused(mini_run, tiny_llama_dir, tmp_path):
    from lorascope.saes import save_sae
    from lorascope.study import run

    store, cfg, _, _ = _mini_parts(mini_run)
    leaky = _train_like_the_study(store, cfg, seed=3, held_out_fraction=0.0, ckpt=tmp_path / "ckpt")  # every doc
    save_sae(leaky, tmp_path / "leaky")
    changed = parse_config(
        mini_config(
            tiny_llama_dir,
            Path(cfg.output_dir),
            **{"reference_sae.source": "path", "reference_sae.path": str(tmp_path / "leaky"), "geometry.splice": False},
        )
    )
    with pytest.raises(LorascopeError, match=r"reference SAE was trained on \d+ of the \d+ evaluation documents"):
        run(changed, progress=False)


def test_study_saes_trained_in_one_pass_equal_each_trained_alone(mini_run, tmp_path):
    """The study trains the SAEs that share a layer, seed and recipe in one pass (saes.multi: here rank_2, rank_4
    and the reference at seed 0); each saved SAE equals the one ``train_sae_job`` trains alone from the same plan
    (same init seed, same stream, same trainer settings), bit for bit."""
    from types import SimpleNamespace

    from lorascope.saes import load_sae
    from lorascope.saes._batches import BatchSource
    from lorascope.saes.multi import why_not_stacked
    from lorascope.study.cache import RunState
    from lorascope.study.saes import SAEJob, _group_key, _plan, _study_trainer, job_sae_and_stream, train_sae_job

    store, cfg, saes, ref_path = _mini_parts(mini_run)
    st = RunState(cfg, tmp_path, progress=False)
    frac = cfg.data.held_out_fraction
    cases = [
        ("L1__rank_4__seed0", SAEJob(1, "delta", "rank_4", 0, frac, cfg.seed), cfg.adapter_sae, saes[0]),
        ("L1__reference", SAEJob(1, "base", None, 0, frac, cfg.seed), cfg.reference_sae, load_sae(ref_path)),
    ]
    plans = [_plan(st, SimpleNamespace(key="k"), job, section, label) for label, job, section, _ in cases]
    assert _group_key(plans[0]) == _group_key(plans[1])  # they were trained together, and stacked:
    built = [job_sae_and_stream(store, p.job, p.section) for p in plans]
    sources = [BatchSource(b[1]) for b in built]
    assert why_not_stacked([b[0] for b in built], sources, _study_trainer(st, plans[0]), [None, None]) is None
    for p, (label, _, section, saved) in zip(plans, cases, strict=True):
        alone = train_sae_job(store, p.job, section, _study_trainer(st, p), None, tmp_path / label, progress=False)
        for name, w in alone.sae.state_dict().items():
            assert torch.equal(saved.state_dict()[name], w), (label, name)
